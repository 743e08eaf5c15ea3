"""benchmarks/bench_step.py: the quick run, and the reference-eager re-creation computing the
same step as fastjepa's fast path."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark


def test_quick_run_writes_one_row_per_mode_with_every_phase(tmp_path):
    module = load_benchmark("bench_step")
    results = tmp_path / "rows.jsonl"
    module.main(["--quick", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["mode"] for r in rows] == list(module.MODES)
    for r in rows:
        assert set(r["phase_ms"]) == set(module.PHASES) and all(v >= 0 for v in r["phase_ms"].values())
        assert r["step_ms"] > 0 and r["images_per_s"] > 0 and r["flops_per_image"] > 0
        assert r["images_per_s"] == round(r["batch"] * 1e3 / r["step_ms"], 2)
    ragged, fastjepa = (next(r for r in rows if r["mode"] == m) for m in ("ragged", "fastjepa"))
    assert ragged["mean_context_tokens"] > fastjepa["mean_context_tokens"]  # nothing truncated


def test_the_trainers_switches_reach_the_step_and_the_rows(tmp_path, monkeypatch):
    """--grad-accum, --activation-checkpointing and --fused-optimizer-ema run the trainer's own
    switches in the fastjepa modes (the fused pass leaves nothing for the EMA phase); the
    reference mode has none of them."""
    module = load_benchmark("bench_step")
    results = tmp_path / "rows.jsonl"
    calls = []
    real = module.train_step
    monkeypatch.setattr(module, "train_step", lambda *a, **k: calls.append(k) or real(*a, **k))
    module.main(["--quick", "--modes", "fastjepa,reference-eager", "--grad-accum", "2", "--activation-checkpointing",
                 "--fused-optimizer-ema", "--results", str(results)])
    fastjepa, reference = [json.loads(line) for line in results.read_text().splitlines()]
    assert (fastjepa["grad_accum_steps"], fastjepa["activation_checkpointing"], fastjepa["fused_optimizer_ema"]) == (2, True, True)
    assert (reference["grad_accum_steps"], reference["activation_checkpointing"], reference["fused_optimizer_ema"]) == (1, False, False)
    assert calls and all(k["accum_steps"] == 2 and k["fused_optimizer_ema"] for k in calls)
    assert fastjepa["phase_ms"]["ema"] == 0 and fastjepa["phase_ms"]["optimizer"] > 0


def test_steps_fed_by_the_loader_report_the_data_wait(tmp_path):
    module = load_benchmark("bench_step")
    results = tmp_path / "rows.jsonl"
    module.main(["--quick", "--data", "pil", "--images", "12", "--images-dir", str(tmp_path / "jpegs"), "--workers", "0",
                 "--modes", "fastjepa,ragged", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["fastjepa", "ragged"] and all(r["data"] == "pil" for r in rows)
    for r in rows:  # the loader decodes in the step's thread (no workers): the step waits for it; masks come with the batch
        assert r["phase_ms"]["data wait"] > 0 and r["phase_ms"]["masks"] == 0 and r["images_per_s"] > 0
    assert rows[1]["mean_context_tokens"] > rows[0]["mean_context_tokens"]  # the loader's masks follow mask.ragged


def test_reference_eager_step_equals_the_fastjepa_step():
    """Same weights, masks and images: the re-created reference step and fastjepa's step give
    the same loss and the same updated target (fp32 on the CPU, so no autocast)."""
    module = load_benchmark("bench_step")
    steps = {mode: module.Step(mode, "vit_tiny", 8, 64, 3, torch.device("cpu"), 2, 48, False, min_keep=2)
             for mode in ("reference-eager", "fastjepa")}
    off = module.untimed
    losses = {mode: [float(step.run(off)) for _ in range(2)] for mode, step in steps.items()}
    torch.testing.assert_close(losses["reference-eager"], losses["fastjepa"], rtol=1e-5, atol=1e-6)
    for a, b in zip(steps["reference-eager"].target.parameters(), steps["fastjepa"].target.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


REFERENCE_CHECKOUT = Path("/work/ref-ijepa")


def test_the_real_reference_step_equals_the_re_created_one():
    """Only where a checkout of facebookresearch/ijepa sits at /work/ref-ijepa (never vendored)."""
    import pytest

    if not (REFERENCE_CHECKOUT / "src" / "helper.py").is_file():
        pytest.skip(f"no reference checkout at {REFERENCE_CHECKOUT}")
    module = load_benchmark("bench_step")
    steps = {mode: module.Step(mode, "vit_tiny", 8, 64, 3, torch.device("cpu"), 2, 48, False, min_keep=2,
                               reference_src=REFERENCE_CHECKOUT)
             for mode in ("reference-eager", module.REFERENCE_SRC_MODE)}
    off = module.untimed
    losses = {mode: [float(step.run(off)) for _ in range(2)] for mode, step in steps.items()}
    torch.testing.assert_close(losses["reference-eager"], losses[module.REFERENCE_SRC_MODE], rtol=1e-5, atol=1e-6)


def test_cuda_graphs_is_refused_clearly_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --cuda-graphs would really run")
    with pytest.raises(SystemExit):
        load_benchmark("bench_step").main(["--quick", "--cuda-graphs"])
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err


def test_report_and_plot_label_the_options_of_a_step_row():
    step_options = load_benchmark("report").step_options
    assert step_options({"compile": False}) == ""
    assert step_options({"compile": True, "cuda_graphs": True, "data": "torchvision"}) == " +cuda-graphs +torchvision data"
    assert step_options({"compile": True, "cuda_graphs": False, "data": "synthetic"}) == " +compile"


def test_finetune_rows_time_the_finetuning_step_and_its_augmentation(tmp_path, monkeypatch):
    import fastjepa.finetune.loop as loop

    module = load_benchmark("bench_step")
    calls = []
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))  # the loop's own step is what runs
    results = tmp_path / "rows.jsonl"
    module.main(["--quick", "--finetune", "--results", str(results)])
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["mode"] == "finetune" and row["preset"] == "finetune_in1k_mae_vith14" and calls
    assert row["step_ms"] > row["augment_ms"] > 0 and 0 < row["augment_share"] < 1 and math.isfinite(row["loss"])
