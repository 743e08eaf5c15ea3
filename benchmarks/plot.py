"""PNG figures from benchmark result rows (the JSONL files under benchmarks/results/).

    python benchmarks/plot.py                                  # every results file -> benchmarks/results/figures/
    python benchmarks/plot.py benchmarks/results/2026-11-28-NVIDIA-H200.jsonl --out figures/

kernels.png: speedup of each provider over the reference idiom, per op, mode and case, and the
achieved % of the measured copy bandwidth for the bandwidth-bound ops. step.png: images/s per
model and mode. phases.png: the time of one step split by phase, per model and mode. Quick
(--quick) rows are left out: they check scripts, they measure nothing. Only the latest run of
each (hardware, op, mode, case, provider) is drawn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import RESULTS  # noqa: E402
from report import REFERENCES, read_rows, step_options  # noqa: E402


def latest(rows, key) -> list[dict]:
    """The last row for each key (rows are in file order, appended over time)."""
    kept = {}
    for r in rows:
        kept[key(r)] = r
    return list(kept.values())


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kernels(rows, path: Path) -> bool:
    rows = latest([r for r in rows if r.get("bench") == "bench_kernels" and not r.get("quick")],
                  lambda r: (r["hardware"], r["op"], r["mode"], r["model"], r["provider"]))
    if not rows:
        return False
    reference = {(r["hardware"], r["op"], r["mode"], r["model"]): r["median_ms"] for r in rows if r["provider"] == REFERENCES[r["op"]]}
    groups = sorted({(r["op"], r["mode"], r["model"]) for r in rows})
    providers = sorted({r["provider"] for r in rows})
    bandwidth = [r for r in rows if "pct_copy" in r]
    fig, axes = plt.subplots(2 if bandwidth else 1, 1, figsize=(max(8, 0.6 * len(groups)), 9 if bandwidth else 5), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs, ys = [], []
        for j, group in enumerate(groups):
            for r in rows:
                ref = reference.get((r["hardware"], *group))
                if (r["op"], r["mode"], r["model"]) == group and r["provider"] == provider and ref:
                    xs.append(j + i * width)
                    ys.append(ref / r["median_ms"])
        ax.bar(xs, ys, width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("speedup over the reference idiom")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [" ".join(g) for g in groups], rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=7)
    if bandwidth:
        ax = axes[1][0]
        labels = [f"{r['op']} {r['mode']} {r['model']}\n{r['provider']}" for r in bandwidth]
        ax.bar(range(len(bandwidth)), [r["pct_copy"] for r in bandwidth])
        ax.axhline(100, color="black", linewidth=0.8)
        ax.set_ylabel("% of measured copy bandwidth")
        ax.set_xticks(range(len(bandwidth)), labels, rotation=75, ha="right", fontsize=6)
    fig.suptitle(f"kernels on {rows[0]['hardware']} ({rows[-1]['date']})")
    _save(fig, path)
    return True


def plot_step(rows, throughput_path: Path, phases_path: Path) -> bool:
    rows = latest([r for r in rows if r.get("bench") == "bench_step" and not r.get("quick")],
                  lambda r: (r["hardware"], r["model"], r["mode"], r["compile"], r.get("cuda_graphs", False), r.get("data", "synthetic")))
    if not rows:
        return False
    labels = [f"{r['model']}\n{r['mode']}{step_options(r)}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows)), 5))
    ax.bar(range(len(rows)), [r["images_per_s"] for r in rows])
    for i, r in enumerate(rows):
        if "mfu" in r:
            ax.annotate(f"{100 * r['mfu']:.0f}% MFU", (i, r["images_per_s"]), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("images/s")
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_title(f"training step on {rows[0]['hardware']} ({rows[-1]['date']})")
    _save(fig, throughput_path)

    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows)), 5))
    bottom = [0.0] * len(rows)
    for phase in rows[0]["phase_ms"]:
        heights = [r["phase_ms"].get(phase, 0.0) for r in rows]
        ax.bar(range(len(rows)), heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("ms per step")
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=7)
    ax.set_title("one step, by phase")
    _save(fig, phases_path)
    return True


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="result files (default: every *.jsonl under benchmarks/results/)")
    parser.add_argument("--out", type=Path, default=RESULTS / "figures")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS.glob("*.jsonl"))
    rows = read_rows(files)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    if plot_kernels(rows, args.out / "kernels.png"):
        written.append(args.out / "kernels.png")
    if plot_step(rows, args.out / "step.png", args.out / "phases.png"):
        written += [args.out / "step.png", args.out / "phases.png"]
    print("\n".join(str(p) for p in written) if written else "no GPU (non-quick) kernel or step rows to draw")
    return written


if __name__ == "__main__":
    main()
