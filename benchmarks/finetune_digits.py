"""fastjepa finetune's default, timed end to end: a 2-step pretraining, then the finetune_digits preset.

    python benchmarks/finetune_digits.py                 # the two commands below, as a user types them
    python benchmarks/finetune_digits.py --out DIR       # keep the runs (default: a temporary folder)

It runs ``fastjepa train --max-steps 2`` (the tiny preset on the embedded photos) and then
``fastjepa finetune --checkpoint RUN/jepa-latest.pth.tar`` (digits, ``configs/finetune_digits.yaml``)
as subprocesses, timing the fine-tuning's wall clock, and appends one row to
benchmarks/results/finetune_digits.jsonl (or --results): the best epoch on held-out train, its
val top-1/top-5, the last epoch's, and the seconds. The goal (issue 28): at least 90% val top-1
in under 5 minutes on a CPU; a 2-step pretraining has learned nearly nothing, so this measures
the fine-tuning itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported by path (the tests), not run as a script
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import RESULTS, cpu_name, write_rows  # noqa: E402

from fastjepa.helper import read_checkpoint  # noqa: E402

GOAL_TOP1, GOAL_SECONDS = 90.0, 300.0


def fastjepa(*args) -> float:
    """Run ``python -m fastjepa ARGS``; its wall-clock seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastjepa", *map(str, args)], check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="where the pretraining and fine-tuning runs go (default: a temporary folder)")
    parser.add_argument("--finetune-args", default="", help="more fastjepa finetune arguments, e.g. '--max-steps 3' (a check of the script)")
    parser.add_argument("--results", type=Path, default=RESULTS / "finetune_digits.jsonl")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        out = args.out or Path(temporary)
        pretraining = fastjepa("train", "--max-steps", 2, "--out", out / "pretrain", "--no-progress", "--device", "cpu")
        seconds = fastjepa("finetune", "--checkpoint", out / "pretrain" / "jepa-latest.pth.tar", "--out", out / "finetune",
                           "--no-progress", "--device", "cpu", *args.finetune_args.split())
        latest = read_checkpoint(out / "finetune" / "finetune-latest.pth.tar")["fastjepa_finetune"]
        best = latest["best"] or {}
        row = {"bench": "finetune_digits", "preset": "finetune_digits", "pretraining_steps": 2, "finetune_seconds": round(seconds, 1),
               "pretraining_seconds": round(pretraining, 1), "epochs": latest["epoch"], "best_epoch": best.get("epoch"),
               "best_heldout_top1": best.get("heldout_top1"), "best_val_top1": best.get("val_top1"), "best_val_top5": best.get("val_top5"),
               "goal": f">= {GOAL_TOP1}% val top-1 in < {GOAL_SECONDS:.0f} s",
               "goal_met": bool(best) and best["val_top1"] >= GOAL_TOP1 and seconds < GOAL_SECONDS,
               "device": "cpu", "hardware": cpu_name(), "threads": torch.get_num_threads()}
    write_rows(args.results, [row], [__file__, *argv])
    print(f"best epoch {row['best_epoch']}: val top-1 {row['best_val_top1']}, top-5 {row['best_val_top5']} "
          f"(held-out {row['best_heldout_top1']}); fine-tuning {row['finetune_seconds']} s; goal met: {row['goal_met']}")
    print(f"appended 1 row to {args.results}")
    return row


if __name__ == "__main__":
    main()
