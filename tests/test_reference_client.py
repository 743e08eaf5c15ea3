"""A client written as the reference's train.py, main.py and main_distributed.py are
(``reference_client.py``) runs on fastjepa's twins: one process (with loader workers, then a
resume) and two under gloo, its own loop and ``fastjepa.train.main``, and the submitit job's
requeue."""

import copy
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fastjepa.data.images import default_photos_dir

HERE = Path(__file__).parent
CSV_HEADER = ["epoch", "itr", "loss", "mask-A", "mask-B", "time (ms)"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture
def config(tmp_path) -> dict:
    """The published ViT-H/14 config cut down to ViT-tiny at 64 px on the 12 embedded photos in
    the reference's layout (root/image_folder/train/<class>/), 6 per class."""
    photos = sorted(Path(default_photos_dir()).glob("*.jpg"))
    for i, photo in enumerate(photos):
        folder = tmp_path / "data" / "imagenet" / "train" / ("n001" if i % 2 else "n000")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder / photo.name)
    (tmp_path / "logs").mkdir()
    config = yaml.safe_load((HERE / "configs" / "in1k_vith14_ep300.yaml").read_text())
    config["data"].update(batch_size=2, crop_size=64, num_workers=0, pin_mem=False, root_path=str(tmp_path / "data"), image_folder="imagenet")
    config["mask"].update(patch_size=8, min_keep=4)
    config["meta"].update(model_name="vit_tiny", pred_depth=2, pred_emb_dim=48, use_bfloat16=False)
    config["optimization"].update(epochs=1, warmup=1)
    config["logging"]["folder"] = str(tmp_path / "logs")
    return config


def launch(tmp_path, config: dict, devices: int, target: str = "client", max_steps: int | None = None) -> None:
    fname = tmp_path / "params.yaml"
    fname.write_text(yaml.safe_dump(config))
    command = [sys.executable, str(HERE / "reference_client.py"), "--fname", str(fname), "--devices", *["cpu"] * devices,
               "--port", str(free_port()), "--target", target]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores: no thread oversubscription
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def rows(path: Path) -> list[list[str]]:
    with open(path) as f:
        return list(csv.reader(f))


def test_the_client_trains_in_one_process_and_resumes(tmp_path, config):
    """Two loader workers (spawned: the dataset, transform and collator are pickled) in the first
    run, none in the resumed one."""
    launch(tmp_path, {**config, "data": {**config["data"], "num_workers": 2}}, devices=1, max_steps=3)
    log = tmp_path / "logs" / "jepa_r0.csv"
    first = rows(log)
    assert first[0] == CSV_HEADER and [r[:2] for r in first[1:]] == [["1", "0"], ["1", "1"], ["1", "2"]]
    for row in first[1:]:
        loss, mask_a, mask_b = float(row[2]), float(row[3]), float(row[4])
        assert 0 < loss < 10 and row[2] == f"{loss:.5f}" and row[5] == "-1"
        assert 4 < mask_a <= 64 and 4 < mask_b <= 64 * 0.2
    checkpoint = torch.load(tmp_path / "logs" / "jepa-latest.pth.tar", weights_only=False)
    assert checkpoint["epoch"] == 1 and all(k.startswith("module.") for k in checkpoint["encoder"])

    resumed = copy.deepcopy(config)
    resumed["meta"]["load_checkpoint"] = True
    resumed["optimization"]["epochs"] = 2
    launch(tmp_path, resumed, devices=1, max_steps=2)
    second = rows(log)
    assert second[: len(first)] == first and second[len(first)] == CSV_HEADER  # the reference's logger appends a header
    assert [r[:2] for r in second[len(first) + 1 :]] == [["2", "0"], ["2", "1"]]
    assert torch.load(tmp_path / "logs" / "jepa-latest.pth.tar", weights_only=False)["epoch"] == 2


def test_the_client_in_two_processes(tmp_path, config):
    """Each rank logs the all-reduced loss (AllReduce), so both CSVs hold the same losses; the
    target block size comes from the collator's step-seeded generator, the same on both ranks."""
    launch(tmp_path, config, devices=2)
    rank0, rank1 = rows(tmp_path / "logs" / "jepa_r0.csv"), rows(tmp_path / "logs" / "jepa_r1.csv")
    assert rank0[0] == rank1[0] == CSV_HEADER
    assert len(rank0) == len(rank1) == 1 + 3  # 12 images, 2 ranks, batch 2
    assert [r[2] for r in rank0[1:]] == [r[2] for r in rank1[1:]]
    assert [r[4] for r in rank0[1:]] == [r[4] for r in rank1[1:]]


def test_main_py_reaches_fastjepa_train_main(tmp_path, config):
    """main.py's process joins a one-process group, then runs fastjepa's trainer in it (the trainer
    under two processes is tests/test_distributed.py's)."""
    launch(tmp_path, config, devices=1, target="app")
    checkpoint = torch.load(tmp_path / "logs" / "jepa-latest.pth.tar", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["world_size"] == 1
    assert len(rows(tmp_path / "logs" / "jepa_r0.csv")) == 1 + 6  # 12 images in batches of 2


def test_main_distributed_trainer_requeue_resumes_from_latest(tmp_path, config, monkeypatch):
    pytest.importorskip("submitit", reason="submitit is not installed (the submit and test extras install it)")
    sys.path.insert(0, str(HERE))
    monkeypatch.setattr(sys, "path", sys.path)
    from reference_client import Trainer

    fname = tmp_path / "params.yaml"
    fname.write_text(yaml.safe_dump(config))
    latest = tmp_path / "logs" / "jepa-latest.pth.tar"
    first = Trainer(str(fname))()
    assert first.steps == 6 and torch.load(latest, weights_only=False)["epoch"] == 1  # 12 images in batches of 2
    requeued = Trainer(str(fname)).checkpoint()
    assert requeued.function.load_model is True
    config["optimization"]["epochs"] = 2
    fname.write_text(yaml.safe_dump(config))
    second = requeued.function()
    assert second.steps == 6 and torch.load(latest, weights_only=False)["epoch"] == 2  # epoch 2 only: resumed


@pytest.mark.slow
def test_the_reference_train_py_on_fastjepa_logs_the_reference_losses(tmp_path):
    """benchmarks/reference_parity.py against a checkout of the reference (FASTJEPA_REFERENCE):
    bit-equal losses and mask sizes at 0 workers, and at 2 workers where the block sizes do not
    depend on the reference's racy step counter."""
    reference = os.environ.get("FASTJEPA_REFERENCE")
    if not reference:
        pytest.skip("set FASTJEPA_REFERENCE to a checkout of facebookresearch/ijepa (CI cannot fetch it)")
    pytest.importorskip("torchvision", reason="the reference's transforms and ImageFolder need torchvision")
    results = tmp_path / "parity.jsonl"
    done = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "reference_parity.py"), "--reference", reference, "--runs", "1",
                           "--epochs", "1", "--results", str(results)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {(r["config"], r["workers"]): r for r in map(json.loads, results.read_text().splitlines())}
    for key in [("vith14-cut-down", 0), ("fixed-block-size", 0), ("fixed-block-size", 2)]:
        assert rows[key]["max_loss_diff"] == 0 and rows[key]["mask_sizes_equal"], rows[key]
