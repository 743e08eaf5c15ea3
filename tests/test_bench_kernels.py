"""benchmarks/bench_kernels.py --quick: every provider runs, is checked against the reference
idiom, and one well-formed row per (op, mode, model, provider) is written."""

import json

from conftest import load_benchmark


def test_quick_run_checks_every_provider_and_writes_rows(tmp_path):
    module = load_benchmark("bench_kernels")
    results = tmp_path / "rows.jsonl"
    rows = module.main(["--quick", "--ops", "gather,ema", "--results", str(results)])
    saved = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(saved) == len(rows) > 0
    providers = {(r["op"], r["provider"]) for r in saved}
    assert {("gather", "reference apply_masks"), ("gather", "torch.gather+expand"), ("gather", "fastjepa torch"),
            ("ema", "reference loop"), ("ema", "torch._foreach_lerp_")} <= providers
    for r in saved:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"] and r["bytes"] > 0
        assert r["gb_s"] == round(r["bytes"] / r["median_ms"] / 1e6, 1)
        assert r["quick"] is True and r["command"].startswith("python benchmarks/bench_kernels.py --quick")
    assert {r["mode"] for r in saved if r["op"] == "gather"} == {"fwd", "bwd", "fwd+bwd"}


def test_quick_adamw_ema_rows_check_every_provider_against_the_torch_backend(tmp_path):
    module = load_benchmark("bench_kernels")
    results = tmp_path / "rows.jsonl"
    module.main(["--quick", "--ops", "adamw_ema", "--results", str(results)])
    saved = [json.loads(line) for line in results.read_text().splitlines()]
    assert {r["provider"] for r in saved} >= {"torch AdamW(fused)+_foreach_lerp_", "fastjepa torch"}
    for r in saved:
        assert r["op"] == "adamw_ema" and r["bytes"] % 36 == 0 and r["median_ms"] > 0


def test_a_wrong_provider_is_caught_before_it_is_timed(tmp_path, monkeypatch):
    module = load_benchmark("bench_kernels")
    monkeypatch.setattr(module, "gather_expand", lambda x, idx: module.reference_apply_masks(x, idx) * 1.001)
    try:
        module.main(["--quick", "--ops", "gather", "--results", str(tmp_path / "rows.jsonl")])
    except AssertionError as e:
        assert "torch.gather+expand disagrees" in str(e)
    else:
        raise AssertionError("a wrong gather was benchmarked")
    assert not (tmp_path / "rows.jsonl").exists()


def test_quick_attention_rows_check_against_the_reference_and_count_flops(tmp_path):
    module = load_benchmark("bench_kernels")
    results = tmp_path / "rows.jsonl"
    module.main(["--quick", "--ops", "attention", "--results", str(results)])
    saved = [json.loads(line) for line in results.read_text().splitlines()]
    assert {r["model"] for r in saved} == set(module.QUICK_ATTENTION_CASES)
    assert {r["mode"] for r in saved} == {"fwd", "bwd", "fwd+bwd"} and "fastjepa torch" in {r["provider"] for r in saved}
    for r in saved:
        assert r["flops"] > 0 and r["tflop_s"] == round(r["flops"] / r["median_ms"] / 1e9, 2)


def test_attention_flop_count_follows_the_flashattention_convention():
    module = load_benchmark("bench_kernels")
    import torch

    case = module.AttentionCase("c", torch.zeros(10, 2, 8), None, None, [3, 7], 0)
    assert case.flops() == 4 * (3 * 3 + 7 * 7) * 2 * 8
    shared = module.AttentionCase("s", torch.zeros(10, 2, 8), None, None, [4, 3, 3], 2)  # context 4, blocks 3 and 3
    assert shared.flops() == 4 * 2 * 8 * (4 * 4 + 3 * (4 + 3) + 3 * (4 + 3))
