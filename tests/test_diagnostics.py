"""Collapse and health diagnostics: the effective rank, ``diagnose``, the trainer's cadence, logs
and summary, and a collapsing run told apart from a normal one."""

import csv

import numpy as np
import pytest
import torch

from fastjepa import train as train_module
from fastjepa.config import ConfigError, tiny_preset, validate
from fastjepa.models import vit_tiny
from fastjepa.plot import plot_run, read_log
from fastjepa.run import COLLAPSE_RANK, COLLAPSE_STD, collapse
from fastjepa.step import DIAGNOSTICS, effective_rank
from fastjepa.train import diagnostics_interval, fit

SMALL = dict(crop_size=48, batch_size=4, repeat=1, pred_depth=1, min_keep=1, epochs=4, warmup=1, progress=False)


def test_effective_rank_of_known_spectra():
    generator = torch.Generator().manual_seed(0)
    orthonormal = torch.linalg.qr(torch.randn(64, 64, generator=generator, dtype=torch.float64))[0][:, :10].T  # 10 equal singular values
    assert effective_rank(orthonormal * 3).item() == pytest.approx(10, rel=1e-4)
    rank_one = torch.randn(50, 1, generator=generator) @ torch.randn(1, 30, generator=generator)
    assert effective_rank(rank_one).item() == pytest.approx(1, abs=1e-3)
    assert effective_rank(torch.zeros(8, 16)).item() == 0
    assert torch.isnan(effective_rank(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])))  # diverged weights: NaN, no SVD error
    two = torch.diag(torch.tensor([1.0, 1.0, 0.0]))
    assert effective_rank(two).item() == pytest.approx(2, rel=1e-5)
    assert torch.isfinite(effective_rank(torch.randn(1, 5, generator=generator)))  # a single sample: rank 1
    assert effective_rank(torch.randn(1, 5, generator=generator)).item() == pytest.approx(1, abs=1e-5)


def test_the_interval_and_bad_values():
    assert diagnostics_interval(None, 100) == 25 and diagnostics_interval(None, 3) == 10
    assert diagnostics_interval(0, 100) == 0 and diagnostics_interval(7, 100) == 7
    config = tiny_preset()
    config["logging"]["diagnostics_every"] = -1
    with pytest.raises(ConfigError, match=r"logging.diagnostics_every must be >= 0 steps \(0 turns them off\), got -1"):
        validate(config)


def log_rows(folder):
    with open(folder / "jepa_r0.csv") as f:
        return list(csv.DictReader(f))


def test_diagnostics_run_on_their_steps_only_and_reach_the_log_and_the_plot(tmp_path, monkeypatch, capsys):
    calls = []
    real = train_module.diagnose
    monkeypatch.setattr(train_module, "diagnose", lambda *args: calls.append(1) or real(*args))
    fit(out=tmp_path, max_steps=6, diagnostics_every=3, **SMALL)
    assert len(calls) == 2  # steps 3 and 6; no other step runs it (its one host sync)
    rows = log_rows(tmp_path)
    measured = [i for i, row in enumerate(rows) if row["target_rank"]]
    assert measured == [2, 5] and all(rows[i][name] == "" for i in (0, 1, 3, 4) for name in DIAGNOSTICS)
    for i in measured:
        values = {name: float(rows[i][name]) for name in DIAGNOSTICS}
        assert values["target_std"] > COLLAPSE_STD and COLLAPSE_RANK < values["target_rank"] <= 4  # batch 4
        assert 1 <= values["pred_rank"] <= 4 * 4 and -1 <= values["pred_cosine"] <= 1
    out = capsys.readouterr().out
    assert "diagnostics at step 6: target_std" in out and "COLLAPSE" not in out
    log = read_log(tmp_path / "jepa_r0.csv")
    assert np.isnan(log["target_rank"][0]) and np.isfinite(log["target_rank"][2])
    assert plot_run(tmp_path).stat().st_size > 0


def test_diagnostics_off(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "diagnose", lambda *args: pytest.fail("diagnostics_every 0 ran diagnose"))
    result = fit(out=tmp_path, max_steps=3, diagnostics_every=0, **SMALL)
    assert result.diagnostics is None and all(row["target_rank"] == "" for row in log_rows(tmp_path))


def test_a_target_frozen_at_zero_is_named_as_a_collapse_while_its_loss_looks_fine(tmp_path, capsys):
    from fastjepa.weights import export_weights

    encoder = vit_tiny(img_size=[48], patch_size=8)
    with torch.no_grad():
        for p in encoder.parameters():
            p.zero_()
    export_weights(encoder, "safetensors", tmp_path / "zero.safetensors")
    result = fit(out=tmp_path / "run", max_steps=4, diagnostics_every=2, init_weights=str(tmp_path / "zero.safetensors"), ema=[1.0, 1.0],
                 **SMALL)
    assert result.diagnostics["target_std"] == 0 and result.diagnostics["target_rank"] == 0
    assert all(loss < 0.05 for loss in result.losses)  # the loss alone does not tell
    out = capsys.readouterr().out
    assert "COLLAPSE: target_rank 0 < 1.5; target_std 0 < 0.0001" in out


def test_collapse_reasons():
    healthy = {"target_std": 0.3, "target_rank": 3.8, "pred_rank": 1.1, "pred_cosine": 0.9}
    assert collapse(healthy) is None  # the predictor's rank is not judged
    assert collapse({**healthy, "target_rank": 1.2}) == "target_rank 1.2 < 1.5"
    assert collapse({**healthy, "target_std": 1e-6}) == "target_std 1e-06 < 0.0001"
