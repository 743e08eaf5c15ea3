"""benchmarks/bench_host.py: the quick run on the meta device (ViT-tiny, two timed steps)."""

import json

from conftest import load_benchmark


def test_quick_run_writes_a_row_per_mode_and_fastjepa_has_no_sync(tmp_path):
    module = load_benchmark("bench_host")
    results = tmp_path / "rows.jsonl"
    module.main(["--quick", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["bench"], r["mode"]) for r in rows] == [("bench_host", m) for m in module.MODES]
    reference, fastjepa = rows
    assert fastjepa["syncs_per_step"] == 0 and fastjepa["sync_calls"] == []
    assert reference["syncs_per_step"] == 1 and reference["sync_calls"] == ["item"]  # the reference's loss.item()
    for r in rows:
        assert r["host_ms_per_step"] > 0 and r["ops_per_step"] > 0 and r["gpu_ms_per_step"] is None
        assert r["device"] == "meta" and r["model"] == "vit_tiny/8-64" and "command" in r and "torch" in r
