"""The trainer end to end on CPU: output folder, exact resume, CLI errors, bad data, no data loss."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from fastjepa.cli import main as cli
from fastjepa.config import tiny_preset
from fastjepa.data.loader import backend_problem
from fastjepa.helper import read_checkpoint
from fastjepa.train import CSV_COLUMNS, fit, main

# A smaller, faster variant of the preset: 48 px crops (6 x 6 patches), a 1-block predictor,
# batch 4 over the 12 photos = 3 steps per epoch.
SMALL = dict(crop_size=48, batch_size=4, repeat=1, pred_depth=1, min_keep=1, epochs=4, warmup=1, progress=False)
CONFIGS = Path(__file__).parent / "configs"


def csv_rows(folder):
    with open(folder / "jepa_r0.csv") as f:
        return list(csv.reader(f))


def test_output_folder_holds_config_log_and_reference_checkpoint(tmp_path):
    result = fit(out=tmp_path, max_steps=4, **SMALL)
    assert result.steps == 4 and len(result.losses) == 4 and all(loss > 0 for loss in result.losses)
    rows = csv_rows(tmp_path)
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 5
    assert [r[:2] for r in rows[1:]] == [["1", "0"], ["1", "1"], ["1", "2"], ["2", "0"]]
    params = yaml.safe_load((tmp_path / "params-ijepa.yaml").read_text())
    assert params["data"]["crop_size"] == 48 and params["meta"]["model_name"] == "vit_tiny"
    checkpoint = read_checkpoint(tmp_path / "jepa-latest.pth.tar")
    for key in ("encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss", "batch_size", "world_size", "lr"):
        assert key in checkpoint, key
    assert all(k.startswith("module.") for k in checkpoint["encoder"])
    assert checkpoint["epoch"] == 1 and checkpoint["fastjepa"]["itr"] == 1  # stopped one step into epoch 2


def test_resume_drops_the_rows_a_stopped_run_logged_after_its_checkpoint(tmp_path):
    fit(out=tmp_path / "straight", max_steps=6, **SMALL)
    fit(out=tmp_path / "split", max_steps=3, **SMALL)  # its checkpoint: the end of epoch 1
    with open(tmp_path / "split" / "jepa_r0.csv", "a") as f:  # a run killed after logging 2 more steps, before a checkpoint
        f.write("2,0,9.99999,9,9,1.0,0.1,0.04,0.996,1.0\n2,1,9.99999,9,9,1.0,0.1,0.04,0.996,1.0\n")
    fit(out=tmp_path / "split", max_steps=3, resume="latest", **SMALL)
    def strip_time(rows):
        return [r[:5] + r[6:9] for r in rows]
    assert strip_time(csv_rows(tmp_path / "straight")) == strip_time(csv_rows(tmp_path / "split"))  # one row per step


def test_resume_of_a_run_logged_by_an_older_version_extends_its_columns(tmp_path):
    from fastjepa.plot import read_log

    fit(out=tmp_path, max_steps=3, **SMALL)
    rows = csv_rows(tmp_path)
    with open(tmp_path / "jepa_r0.csv", "w", newline="") as f:  # as fastjepa wrote it before the diagnostics columns
        csv.writer(f).writerows(row[:10] for row in rows)
    fit(out=tmp_path, max_steps=2, resume="latest", **SMALL)
    upgraded = csv_rows(tmp_path)
    assert tuple(upgraded[0]) == CSV_COLUMNS and len(upgraded) == 6 and all(len(row) == len(CSV_COLUMNS) for row in upgraded)
    assert [row[:3] for row in upgraded[1:4]] == [row[:3] for row in rows[1:4]]
    assert len(read_log(tmp_path / "jepa_r0.csv")["loss"]) == 5


@pytest.mark.parametrize("first, bf16", [(2, False), (3, False), (2, True)], ids=["in-epoch", "epoch-boundary", "bf16-shadow"])
def test_resume_continues_exactly(tmp_path, first, bf16):
    """bf16: autocast with the target's bf16 shadow, which is not saved but rebuilt from the target."""
    small = dict(SMALL, use_bfloat16=bf16)
    straight = fit(out=tmp_path / "straight", max_steps=6, **small)
    fit(out=tmp_path / "split", max_steps=first, **small)
    resumed = fit(out=tmp_path / "split", max_steps=6 - first, resume="latest", **small)
    assert resumed.steps == 6 - first
    def strip_time(rows):
        return [r[:5] + r[6:9] for r in rows]  # the time and throughput columns differ
    assert strip_time(csv_rows(tmp_path / "straight")) == strip_time(csv_rows(tmp_path / "split"))
    a = read_checkpoint(tmp_path / "straight" / "jepa-latest.pth.tar")
    b = read_checkpoint(tmp_path / "split" / "jepa-latest.pth.tar")
    for part in ("encoder", "predictor", "target_encoder"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part  # bit for bit
    assert straight.losses[first:] == resumed.losses


def test_reference_main_takes_a_config_dict(tmp_path):
    config = tiny_preset()
    config["data"].update(crop_size=48, batch_size=4, repeat=1)
    config["mask"]["min_keep"] = 1
    config["meta"]["pred_depth"] = 1
    config["optimization"]["epochs"] = 1
    config["logging"]["folder"] = str(tmp_path / "run")
    result = main(config, progress=False)
    assert result.folder == tmp_path / "run" and result.steps == 3
    assert (tmp_path / "run" / "jepa-latest.pth.tar").exists()


def write_images(folder, count, size=(60, 50)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8).numpy()).save(folder / f"img{i}.png")


def test_bad_files_are_skipped_and_counted(tmp_path, capsys):
    data = tmp_path / "data"
    write_images(data, 8)
    good = (data / "img0.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 3])
    (data / "notes.txt").write_text("not an image")
    (data / "fake.jpg").write_text("not a jpeg either")
    result = fit(out=tmp_path / "run", root_path=str(data), **{**SMALL, "batch_size": 5, "epochs": 2, "backend": "pil"})
    assert result.steps == 4 and result.skipped_images >= 1  # 10 image files -> 2 steps per epoch
    out = capsys.readouterr().out
    assert "1 files that are not images" in out and "unreadable images skipped" in out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastjepa", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "mask.min_kepe=3"], "unknown key mask.min_kepe"),
        (["--set", "data.batch_size=zero"], "data.batch_size must be an integer"),
        (["--set", "optimization.lr=-1"], "optimization.lr must be > 0"),
        (["--config", "/nonexistent.yaml"], "cannot read config"),
        (["--set", "nodot"], "section.key=value"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(args, message):
    done = run_cli("train", *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cli_data_and_checkpoint_errors_exit_1(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_cli("train", "--set", f"data.root_path={empty}", "--out", str(tmp_path / "a"))
    assert done.returncode == 1 and "no images" in done.stderr.lower()
    run = tmp_path / "b"
    run.mkdir()
    (run / "jepa-latest.pth.tar").write_bytes(b"\x80\x02truncated")
    done = run_cli("train", "--out", str(run), "--resume")
    assert done.returncode == 1 and "truncated or corrupt" in done.stderr


@pytest.mark.parametrize("name", ["in1k_vith14_ep300", "in1k_vith16-448_ep300", "in22k_vith14_ep66", "in22k_vitg16_ep44"])
def test_dry_run_of_published_configs(name):
    done = run_cli("train", "--config", str(CONFIGS / f"{name}.yaml"), "--dry-run")
    assert done.returncode == 0, done.stderr
    for expected in ("config is valid", "encoder", "GFLOP", "memory", "not found"):
        assert expected in done.stdout


def test_dry_run_reports_the_reference_vit_h_numbers(capsys):
    assert cli(["train", "--config", str(CONFIGS / "in1k_vith14_ep300.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "encoder 630.4 M" in out and "predictor 22.3 M" in out


def test_interrupt_during_a_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    fit(out=tmp_path, max_steps=2, **SMALL)
    before = (tmp_path / "jepa-latest.pth.tar").read_bytes()
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        fit(out=tmp_path, max_steps=1, resume="latest", **SMALL)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "jepa-latest.pth.tar").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    read_checkpoint(tmp_path / "jepa-latest.pth.tar")


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    fit(out=tmp_path, max_steps=1, **SMALL)
    before = (tmp_path / "jepa-latest.pth.tar").read_bytes()
    with pytest.raises(FloatingPointError, match="global step"):
        fit(out=tmp_path, max_steps=5, resume="latest", **{**SMALL, "lr": 1e30, "start_lr": 1e30, "weight_decay": 0.0, "final_weight_decay": 0.0})
    assert (tmp_path / "jepa-latest.pth.tar").read_bytes() == before


@pytest.mark.slow
def test_default_train_finishes_with_a_falling_loss(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastjepa", "train", "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (folder,) = tmp_path.glob("fastjepa-run-*")
    losses = [float(r[2]) for r in csv_rows(folder)[1:]]
    assert len(losses) == 240
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


def test_checkpoint_every_and_numbered_copies(tmp_path, monkeypatch):
    import fastjepa.run as run
    import fastjepa.train as train

    written = []
    real = run.save_checkpoint
    monkeypatch.setattr(run, "save_checkpoint", lambda state, path: (written.append((Path(path).name, state["fastjepa"]["itr"])), real(state, path)))
    monkeypatch.setattr(train, "CHECKPOINT_FREQ", 2)
    fit(out=tmp_path, checkpoint_every=2, **SMALL)  # 4 epochs of 3 steps
    assert ("jepa-latest.pth.tar", 2) in written  # step 2, inside epoch 1
    assert [name for name, _ in written if "-ep" in name] == ["jepa-ep2.pth.tar", "jepa-ep4.pth.tar"]
    assert read_checkpoint(tmp_path / "jepa-ep2.pth.tar")["epoch"] == 2


def test_tensorboard_scalars_when_tensorboard_is_installed(tmp_path, monkeypatch):
    import types

    scalars = []

    class FakeWriter:
        def __init__(self, log_dir):
            assert Path(log_dir) == tmp_path / "tensorboard"

        def add_scalar(self, name, value, step):
            scalars.append((name, step))

        def close(self):
            scalars.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    fit(out=tmp_path, max_steps=2, **SMALL)
    assert ("loss", 0) in scalars and ("img_per_s", 1) in scalars and scalars[-1] == ("closed", None)


def test_empty_override_sets_an_empty_path():
    from fastjepa.config import apply_override, validate

    config = {}
    apply_override(config, "data.image_folder=")
    assert validate(config)["data"]["image_folder"] == ""


@pytest.mark.skipif(backend_problem("dali", torch.device("cpu")) is not None, reason="NVIDIA DALI is not importable")
def test_dali_backend_trains_and_resumes_exactly(tmp_path, capsys):
    small = dict(SMALL, backend="dali", use_horizontal_flip=True)
    straight = fit(out=tmp_path / "straight", max_steps=5, **small)
    assert "data backend dali" in capsys.readouterr().out
    fit(out=tmp_path / "split", max_steps=2, **small)
    resumed = fit(out=tmp_path / "split", max_steps=3, resume="latest", **small)
    assert straight.losses[2:] == resumed.losses and len(resumed.losses) == 3
    a = read_checkpoint(tmp_path / "straight" / "jepa-latest.pth.tar")
    b = read_checkpoint(tmp_path / "split" / "jepa-latest.pth.tar")
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in a["encoder"])


def test_auto_backend_is_pil_on_the_cpu(tmp_path, capsys):
    fit(out=tmp_path, max_steps=1, device="cpu", **SMALL)
    assert "data backend pil" in capsys.readouterr().out


@pytest.mark.parametrize("signal_name, after_steps", [("SIGTERM", 2), ("SIGUSR1", 3)], ids=["mid-epoch", "epoch-end"])
def test_preemption_signal_checkpoints_and_resume_auto_continues_exactly(tmp_path, monkeypatch, capsys, signal_name, after_steps):
    import os
    import signal

    import fastjepa.train as train_module

    straight = fit(out=tmp_path / "straight", max_steps=6, **SMALL)
    number = getattr(signal, signal_name)
    handler_before = signal.getsignal(number)
    real_step, calls = train_module.train_step, []

    def step_then_signal(*args, **kwargs):
        result = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == after_steps:
            os.kill(os.getpid(), number)  # the trainer's handler records it; the step finishes
        return result

    monkeypatch.setattr(train_module, "train_step", step_then_signal)
    first = fit(out=tmp_path / "split", max_steps=6, **SMALL)
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert first.steps == after_steps and f"{signal_name} received: stopped after step {after_steps}" in capsys.readouterr().out
    assert signal.getsignal(number) == handler_before  # the trainer put the previous handler back
    resumed = fit(out=tmp_path / "split", max_steps=6 - after_steps, resume="auto", **SMALL)
    assert first.losses + resumed.losses == straight.losses
    a = read_checkpoint(tmp_path / "straight" / "jepa-latest.pth.tar")
    b = read_checkpoint(tmp_path / "split" / "jepa-latest.pth.tar")
    for part in ("encoder", "predictor", "target_encoder"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    result = fit(out=tmp_path / "fresh", max_steps=1, resume="auto", **SMALL)
    assert result.steps == 1 and (tmp_path / "fresh" / "jepa-latest.pth.tar").exists()


def _nan_images_at(call: int, monkeypatch):
    """Make the trainer's train_step see NaN images at its call number ``call`` (0-based)."""
    import fastjepa.train as train_module

    real_step, calls = train_module.train_step, []

    def step(model, target, optimizer, lr, wd, momentum, images, *rest, **options):
        calls.append(1)
        if len(calls) - 1 == call:
            images = images.clone()
            images[0, 0, 0, 0] = float("nan")
        return real_step(model, target, optimizer, lr, wd, momentum, images, *rest, **options)

    monkeypatch.setattr(train_module, "train_step", step)


def test_a_nonfinite_step_stops_the_run_naming_it_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    _nan_images_at(2, monkeypatch)
    with pytest.raises(FloatingPointError, match=r"loss is nan; non-finite gradients in \d+ tensors .* at epoch 1, step 2 "
                                                 r"\(global step 2\); .*meta.skip_nonfinite"):
        fit(out=tmp_path, max_steps=6, checkpoint_every=1, **SMALL)
    checkpoint = read_checkpoint(tmp_path / "jepa-latest.pth.tar")
    assert checkpoint["fastjepa"]["itr"] == 2 and len(csv_rows(tmp_path)) == 3  # the two steps before it
    assert all(torch.isfinite(v).all() for part in ("encoder", "predictor", "target_encoder") for v in checkpoint[part].values())


def test_skip_nonfinite_leaves_the_step_out_and_carries_on(tmp_path, monkeypatch, capsys):
    _nan_images_at(1, monkeypatch)
    result = fit(out=tmp_path, max_steps=4, skip_nonfinite=True, **SMALL)
    out = capsys.readouterr().out
    assert "skipped epoch 1, step 1 (global step 1): loss is nan" in out and "non-finite loss or gradient: 1" in out
    assert result.steps == 3 and result.nonfinite_steps == 1 and all(math.isfinite(loss) for loss in result.losses)
    assert [r[:2] for r in csv_rows(tmp_path)[1:]] == [["1", "0"], ["1", "2"], ["2", "0"]]
    checkpoint = read_checkpoint(tmp_path / "jepa-latest.pth.tar")
    assert (checkpoint["epoch"], checkpoint["fastjepa"]["itr"]) == (1, 1)  # the skipped step still counts as a step
    assert all(torch.isfinite(v).all() for v in checkpoint["encoder"].values())


def test_nonfinite_weights_are_never_written_to_a_checkpoint(tmp_path, monkeypatch):
    import fastjepa.train as train_module

    real_step, calls = train_module.train_step, []

    def step_then_poison(model, target, *rest, **options):
        result = real_step(model, target, *rest, **options)
        calls.append(1)
        if len(calls) == 1:  # the run's last step: its loss stays finite, only the save can see the target
            next(target.parameters()).data[0] = float("inf")
        return result

    fit(out=tmp_path, max_steps=1, **SMALL)
    before = (tmp_path / "jepa-latest.pth.tar").read_bytes()
    monkeypatch.setattr(train_module, "train_step", step_then_poison)
    with pytest.raises(FloatingPointError, match="not writing checkpoint .*jepa-latest.pth.tar: the weights or optimizer state hold NaN"):
        fit(out=tmp_path, max_steps=1, resume="latest", **SMALL)
    assert (tmp_path / "jepa-latest.pth.tar").read_bytes() == before
