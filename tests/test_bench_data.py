"""benchmarks/bench_data.py --quick: every pipeline that can run here runs and writes a well-formed row."""

import json
import tarfile

import torch
from conftest import load_benchmark

from fastjepa.data.loader import backend_problem


def test_quick_run_writes_one_row_per_pipeline(tmp_path):
    results = tmp_path / "rows.jsonl"
    rows = load_benchmark("bench_data").main(["--quick", "--results", str(results), "--images-dir", str(tmp_path / "images")])
    saved = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(saved) == len(rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected = {"reference-style", "pil"}
    if backend_problem("dali", torch.device(device)) is None:
        expected |= {f"dali-{device}", f"dali-random-crop-{device}"}
    if backend_problem("torchvision", torch.device(device)) is None:
        expected.add(f"torchvision-{device}")
    assert {r["pipeline"] for r in saved} == expected
    for r in saved:
        assert r["img_s"] > 0 and r["timed_images"] == 8 and r["workers"] == 1 and r["quick"] is True
        assert r["vs_reference"] == round(r["img_s"] / next(s["img_s"] for s in saved if s["pipeline"] == "reference-style"), 2)
        assert r["command"].startswith("python benchmarks/bench_data.py --quick") and r["device"] == device
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 12
    assert {r["layout"] for r in saved} == {"files"}


def test_shards_feed_fastjepas_pipelines_and_the_reference_reads_files(tmp_path):
    results = tmp_path / "rows.jsonl"
    load_benchmark("bench_data").main(["--quick", "--shards", "--pipelines", "reference-style,pil", "--results", str(results),
                                       "--images-dir", str(tmp_path / "images")])
    saved = {r["pipeline"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert saved["pil"]["layout"] == "shards" and saved["reference-style"]["layout"] == "files"
    assert saved["pil"]["timed_images"] == 8
    shards = sorted((tmp_path / "images-shards").glob("*.tar"))
    assert len(shards) == 1 and sum(name.endswith(".jpg") for name in tarfile.open(shards[0]).getnames()) == 12
