"""benchmarks/scaling.py: the gradient bytes, the all-reduce and overlap arithmetic, the
300-epoch projection, and a run end to end (with and without a measured bench_step row)."""

import json
import math

import pytest
import torch
from conftest import load_benchmark

from fastjepa.models import vision_transformer as vit

scaling = load_benchmark("scaling")


@pytest.mark.parametrize("model", list(scaling.MODELS))
def test_gradient_bytes_are_four_bytes_per_trainable_parameter_of_encoder_and_predictor(model):
    """Counted here from the model builders directly (not through init_model): every
    requires_grad tensor of the encoder and a depth-12, width-384 predictor; the target
    encoder is a copy with no gradients, so it adds nothing."""
    name, patch, crop = scaling.MODELS[model]
    with torch.device("meta"):
        encoder = getattr(vit, name)(img_size=[crop], patch_size=patch)
        predictor = vit.vit_predictor(num_patches=encoder.patch_embed.num_patches, embed_dim=encoder.embed_dim,
                                      predictor_embed_dim=384, depth=12, num_heads=encoder.num_heads)
    count = sum(p.numel() for m in (encoder, predictor) for p in m.parameters() if p.requires_grad)
    assert scaling.gradient_bytes(model) == 4 * count
    assert scaling.gradient_bytes(model, 2) == 2 * count
    assert not encoder.pos_embed.requires_grad  # the frozen sin-cos table is not all-reduced


def test_vit_huge_gradient_bytes_match_the_published_parameter_counts():
    """ViT-H/14 encoder 630.4 M and depth-12 predictor 22.3 M (../shared/REFERENCE.md §2): about 2.6 GB in fp32."""
    encoder, predictor = scaling.trainable_params("vit_huge/14")
    assert round(encoder / 1e6, 1) == 630.4 and round(predictor / 1e6, 1) == 22.3
    assert scaling.gradient_bytes("vit_huge/14") == pytest.approx(2.611e9, rel=1e-3)


def test_ring_all_reduce_on_known_numbers():
    # 8 ranks, 1 GB, 100 GB/s: 2*7/8 GB at 100 GB/s = 17.5 ms, plus 14 steps of 1 us
    assert scaling.ring_allreduce_s(1e9, 8, 100.0, 1e-6) == pytest.approx(0.0175 + 14e-6)
    assert scaling.ring_allreduce_s(1e9, 2, 100.0, 0.0) == pytest.approx(0.01)  # n=2: each sends half and receives half, twice
    assert scaling.ring_allreduce_s(1e9, 1, 100.0, 1.0) == 0.0
    # A100 links at 0.8 of 300 GB/s per direction and 25 GB/s per rail
    a100 = scaling.GPUS["A100"]
    assert (a100.nvlink_bus_gb_s, a100.ib_bus_gb_s) == (pytest.approx(240.0), pytest.approx(20.0))


def test_hierarchical_all_reduce_is_the_ring_within_a_node_plus_the_shard_across_nodes():
    h100 = scaling.GPUS["H100"]
    nbytes = 2.6e9
    one_node = scaling.allreduce_s(nbytes, 8, h100)
    assert one_node == pytest.approx(scaling.ring_allreduce_s(nbytes, 8, h100.nvlink_bus_gb_s, scaling.LATENCY_NVLINK_S))
    four_nodes = scaling.allreduce_s(nbytes, 32, h100)
    assert four_nodes - one_node == pytest.approx(scaling.ring_allreduce_s(nbytes / 8, 4, h100.ib_bus_gb_s, scaling.LATENCY_IB_S))
    assert scaling.allreduce_s(nbytes, 4, h100) < one_node  # 4 GPUs of one node: a shorter ring


def test_efficiency_is_one_when_communication_hides_in_the_backward():
    assert scaling.exposed_s(backward_s=0.5, comm_s=0.3, last_bucket_s=0.0) == 0.0
    assert scaling.efficiency(1.0, scaling.exposed_s(0.5, 0.3, 0.0)) == 1.0
    assert scaling.exposed_s(backward_s=0.5, comm_s=0.3, last_bucket_s=0.01) == pytest.approx(0.01)  # only the last bucket
    assert scaling.exposed_s(backward_s=0.1, comm_s=0.3, last_bucket_s=0.01) == pytest.approx(0.2)  # 0.29 - 0.1 + 0.01
    assert scaling.efficiency(1.0, 0.25) == pytest.approx(0.8)


def test_efficiency_falls_as_gpus_grow_at_a_fixed_global_batch():
    """A fast one-GPU rate, so the backward no longer covers the all-reduce: each GPU's share of
    the 2048 images (and its backward) shrinks while the gradient bytes stay the same."""
    steps = [scaling.step_model("vit_huge/14", n, scaling.GPUS["H200"], 2000.0, 0.33, 4) for n in (8, 16, 32, 64, 128)]
    effs = [s["efficiency"] for s in steps]
    assert all(a > b for a, b in zip(effs, effs[1:])) and effs[-1] < 0.5
    assert [s["per_gpu_batch"] for s in steps] == [256, 128, 64, 32, 16]
    assert len({s["grad_bytes"] for s in steps}) == 1
    bf16 = scaling.step_model("vit_huge/14", 128, scaling.GPUS["H200"], 2000.0, 0.33, 2)
    assert bf16["efficiency"] > effs[-1] and bf16["grad_bytes"] * 2 == steps[-1]["grad_bytes"]
    # at a rate below "hidden up to", only the last bucket is exposed
    slow = scaling.step_model("vit_huge/14", 32, scaling.GPUS["H200"], 0.9 * steps[2]["hidden_up_to_img_per_s"], 0.33, 4)
    last = scaling.allreduce_s(scaling.BUCKET_MB * 2**20, 32, scaling.GPUS["H200"])
    assert slow["exposed_ms"] == pytest.approx(1e3 * last)


def test_the_projection_inverts_the_papers_72_hours():
    rate = scaling.paper_img_per_s_per_gpu()
    assert scaling.steps_per_run() == 300 * 625
    assert rate == pytest.approx(2048 / (72 * 3600 / 187_500) / 16)  # about 92.6 img/s per A100
    hours, gpu_hours = scaling.projection_hours(rate, 16, 1.0)
    assert hours == pytest.approx(72.0) and gpu_hours == pytest.approx(1152.0)
    assert scaling.projection_hours(rate, 32, 1.0)[0] == pytest.approx(36.0)
    assert scaling.projection_hours(rate, 16, 0.5)[0] == pytest.approx(144.0)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_main_without_measurements_uses_the_paper_and_says_so(tmp_path):
    rows = scaling.main(["--results-dir", str(tmp_path), "--gpus", "16,128", "--plot", str(tmp_path / "scaling.png")])
    text = (tmp_path / "scaling.jsonl").read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON
    written = _rows(tmp_path / "scaling.jsonl")
    assert len(written) == len(rows) and all(r["bench"] == "scaling" and r["command"].startswith("python benchmarks/scaling.py") for r in written)
    assert [r["model"] for r in written if r["kind"] == "gradient_bytes"] == list(scaling.MODELS)
    eff = [r for r in written if r["kind"] == "efficiency"]
    assert len(eff) == len(scaling.GPUS) * len(scaling.GRAD_DTYPES) * 2
    for r in eff:
        rate = r["inputs"]["img_per_s_per_gpu"]
        assert rate["kind"] == "reference paper" and rate["source"].startswith("reference paper") and "not a measurement" in rate["source"]
        assert all("source" in v for v in r["inputs"].values())
        assert 0 < r["efficiency"] <= 1
        assert r["hours_300_epochs"] == pytest.approx(
            scaling.projection_hours(r["img_per_s_per_gpu"], r["gpus"], r["efficiency"])[0], rel=1e-3, abs=0.01)  # rows are rounded
    a100 = next(r for r in eff if (r["gpu"], r["gpus"], r["grad_dtype"]) == ("A100", 16, "fp32"))
    assert a100["hours_300_epochs"] == pytest.approx(72.0, abs=0.5)  # the paper's own rate gives back its 72 h
    assert "scaled A100->H200" in next(r for r in eff if r["gpu"] == "H200")["inputs"]["img_per_s_per_gpu"]["source"]
    reference = next(r for r in written if r["kind"] == "reference")
    assert (reference["gpus"], reference["gpu"], reference["hours_300_epochs"]) == (16, "A100", 72.0)
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_main_reads_a_measured_bench_step_row_and_names_its_file(tmp_path):
    row = {"bench": "bench_step", "model": "vit_huge/14", "mode": "fastjepa", "batch": 128, "quick": False, "device": "cuda",
           "hardware": "NVIDIA H200", "images_per_s": 640.0, "date": "2026-12-01 10:00 UTC",
           "phase_ms": {"target forward": 60.0, "context forward": 40.0, "backward": 80.0, "optimizer": 20.0}}
    ignored = [{**row, "quick": True, "images_per_s": 1.0}, {**row, "mode": "reference-eager", "images_per_s": 2.0},
               {**row, "data": "torchvision", "images_per_s": 3.0}]  # fed by a loader: not the model's compute rate
    (tmp_path / "2026-12-01-NVIDIA-H200.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [row, *ignored]))
    rows = scaling.main(["--results-dir", str(tmp_path), "--gpus", "8,64"])
    eff = {(r["gpu"], r["gpus"], r["grad_dtype"]): r for r in rows if r["kind"] == "efficiency"}
    h200 = eff["H200", 8, "fp32"]
    assert h200["img_per_s_per_gpu"] == 640.0
    assert h200["inputs"]["img_per_s_per_gpu"]["source"].startswith("measured 2026-12-01-NVIDIA-H200.jsonl")
    assert h200["inputs"]["backward_fraction"]["value"] == pytest.approx(0.4)
    assert h200["compute_ms"] == pytest.approx(256 / 640 * 1e3)
    assert eff["A100", 8, "fp32"]["img_per_s_per_gpu"] == pytest.approx(640.0 * 312 / 989, abs=0.01)
    # an explicit rate wins over the measurement
    rows = scaling.main(["--results-dir", str(tmp_path), "--gpus", "8", "--img-per-s", "100", "--rate-gpu", "A100"])
    a100 = next(r for r in rows if r["kind"] == "efficiency" and r["gpu"] == "A100")
    assert a100["img_per_s_per_gpu"] == 100.0 and a100["inputs"]["img_per_s_per_gpu"]["source"].startswith("argument")
    assert math.isclose(a100["inputs"]["backward_fraction"]["value"], 0.33, abs_tol=0.01)  # from the FLOPs, not the H200 row


def test_a_model_without_any_rate_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        scaling.main(["--results-dir", str(tmp_path), "--model", "vit_base/16"])
