"""torch.distributed on the CPU (gloo, 2 processes under torchrun): DDP and FSDP2 steps equal
one process with twice the batch, bf16 gradient all-reduce, the trainer under torchrun
(per-rank logs and shards, one checkpoint, FSDP2 exact resume, a preemption notice reaching
one rank), and the launch environment (torchrun, SLURM)."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tensors
from distributed_steps import run

from fastjepa.distributed import first_host, launch_from_environment
from fastjepa.helper import read_checkpoint

HERE = Path(__file__).parent
STEPS, BATCH = 3, 8  # the global batch: 4 images per rank with 2 ranks
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: only the order of the gradient sums differs


def torchrun(*args, nproc: int = 2, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=HERE, **popen)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def max_difference(a: dict, b: dict) -> float:
    b_tensors = dict(tensors(b))
    pairs = [(t, b_tensors[name]) for name, t in tensors(a) if t.is_floating_point()]
    assert pairs and len(pairs) == sum(1 for _, t in tensors(b) if t.is_floating_point())
    return max((x - y).abs().max().item() for x, y in pairs)


@pytest.fixture(scope="module")
def one_process():
    torch.manual_seed(0)
    return run(STEPS, BATCH)


@pytest.mark.parametrize("sharding, options", [("ddp", []), ("fsdp", []), ("ddp", ["--accum", 2]), ("fsdp", ["--accum", 2]),
                                               ("ddp", ["--compile", "--fused"]), ("fsdp", ["--fused"]),
                                               pytest.param("fsdp", ["--compile", "--fused"], marks=pytest.mark.slow)],
                         ids=["ddp", "fsdp", "ddp-accumulation", "fsdp-accumulation", "ddp-compiled-fused", "fsdp-fused", "fsdp-compiled-fused"])
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, one_process, sharding, options):
    """--accum 2: each rank's half of the batch in 2 micro-batches (DDP's no_sync / FSDP2's
    set_requires_gradient_sync in the first); --compile --fused: the blocks compiled (aot_eager)
    inside the wrapper and AdamW + EMA as adamw_ema_ passes on each rank's (local) tensors.
    Each the same as one eager process on the whole batch."""
    torchrun("distributed_steps.py", tmp_path / "two.pt", "--steps", STEPS, "--batch", BATCH, "--sharding", sharding, *options)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one_process["losses"]), **TOL)
    for name, expected in tensors(one_process["state"]):  # weights, target, AdamW moments: every tensor whole
        if expected.is_floating_point():
            torch.testing.assert_close(dict(tensors(two["state"]))[name], expected, **TOL, msg=lambda m: f"{name}: {m}")
    # the comparison can fail: one process on one rank's half of the batch ends elsewhere, and the weights moved
    assert max_difference(run(STEPS, BATCH // 2)["state"], two["state"]) > 100 * TOL["atol"]
    assert max_difference(run(0, BATCH)["state"]["encoder"], two["state"]["encoder"]) > 100 * TOL["atol"]


def test_bf16_gradient_all_reduce_is_close_to_fp32_but_not_equal(tmp_path, one_process):
    torchrun("distributed_steps.py", tmp_path / "bf16.pt", "--steps", STEPS, "--batch", BATCH, "--grad-reduce-dtype", "bfloat16")
    bf16 = torch.load(tmp_path / "bf16.pt", weights_only=False)
    torch.testing.assert_close(torch.tensor(bf16["losses"]), torch.tensor(one_process["losses"]), rtol=1e-3, atol=0)
    difference = max_difference(bf16["state"]["encoder"], one_process["state"]["encoder"])
    assert 0 < difference < STEPS * 1e-3  # lr 1e-3: AdamW moves a weight by at most about lr per step


# ---------------------------------------------------------------------------- the trainer under torchrun

TRAIN = ["-m", "fastjepa", "train", "--device", "cpu", "--no-progress", "--set", "data.batch_size=2", "--set", "data.crop_size=48",
         "--set", "data.repeat=1", "--set", "meta.pred_depth=1", "--set", "mask.min_keep=1"]  # 12 photos: 3 steps per epoch per rank


def rows(folder: Path, rank: int) -> list[list[str]]:
    with open(folder / f"jepa_r{rank}.csv") as f:
        return list(csv.reader(f))[1:]


def test_trainer_under_torchrun_logs_per_rank_and_writes_one_checkpoint(tmp_path):
    done = torchrun(*TRAIN, "--out", tmp_path, "--max-steps", 4)
    assert done.stdout.count("fastjepa train:") == 1 and "x 2 processes (ddp)" in done.stdout  # rank 0 speaks
    r0, r1 = rows(tmp_path, 0), rows(tmp_path, 1)
    assert [r[:2] for r in r0] == [r[:2] for r in r1] == [["1", "0"], ["1", "1"], ["1", "2"], ["2", "0"]]
    assert [r[2] for r in r0] != [r[2] for r in r1]  # other images and masks on each rank: other losses
    checkpoint = read_checkpoint(tmp_path / "jepa-latest.pth.tar")
    assert checkpoint["world_size"] == 2 and checkpoint["batch_size"] == 2 and checkpoint["fastjepa"]["itr"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_fsdp_checkpoint_is_whole_and_resume_continues_exactly(tmp_path):
    fsdp = ["--set", "meta.sharding=fsdp"]
    torchrun(*TRAIN, *fsdp, "--out", tmp_path / "straight", "--max-steps", 4)
    torchrun(*TRAIN, *fsdp, "--out", tmp_path / "split", "--max-steps", 2)
    torchrun(*TRAIN, *fsdp, "--out", tmp_path / "split", "--max-steps", 2, "--resume", "auto")
    a = read_checkpoint(tmp_path / "straight" / "jepa-latest.pth.tar")
    b = read_checkpoint(tmp_path / "split" / "jepa-latest.pth.tar")
    assert a["encoder"]["module.patch_embed.proj.weight"].shape == (192, 3, 8, 8)  # gathered whole: the reference's format
    for (name, x), (_, y) in zip(tensors({k: a[k] for k in ("encoder", "predictor", "target_encoder", "opt")}),
                                 tensors({k: b[k] for k in ("encoder", "predictor", "target_encoder", "opt")})):
        assert torch.equal(x, y), name
    for rank in (0, 1):
        assert [r[2] for r in rows(tmp_path / "straight", rank)] == [r[2] for r in rows(tmp_path / "split", rank)]


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among parent's children (Linux /proc)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the rank's process through Linux /proc")
def test_a_preemption_notice_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *TRAIN,
               "--out", str(tmp_path), "--set", "optimization.epochs=50"]
    launcher = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((tmp_path / "jepa_r1.csv").exists() and len(rows(tmp_path, 1)) >= 2):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run ended or hung before its second step"
            time.sleep(0.2)
        os.kill(_rank_pid(launcher.pid, 1), signal.SIGTERM)  # rank 1 only
        out, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, out[-2000:] + err[-4000:]
    assert "a preemption notice (on another rank) received" in out  # rank 0 heard of it through the agreement
    steps = len(rows(tmp_path, 0))
    assert steps == len(rows(tmp_path, 1)) and 2 <= steps < 150
    checkpoint = read_checkpoint(tmp_path / "jepa-latest.pth.tar")
    assert checkpoint["epoch"] * 3 + checkpoint["fastjepa"]["itr"] == steps


# ---------------------------------------------------------------------------- the launch environment


@pytest.mark.parametrize("nodelist, host", [("node07", "node07"), ("gpu[07-09,12]", "gpu07"), ("a[3],b[1-2]", "a3"),
                                            ("dgx-h100-[001-016]", "dgx-h100-001"), ("n1,n2", "n1")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_launch_from_torchrun_slurm_or_nothing():
    torchrun_env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    launch = launch_from_environment(torchrun_env)  # torchrun wins over an enclosing SLURM allocation
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr) == (3, 8, 1, None)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    launch = launch_from_environment(slurm)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port) == (5, 16, 5, "gpu07", 20000 + 123456 % 20000)
    assert launch_from_environment({**slurm, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}).master_port == 29500
    assert launch_from_environment({**slurm, "SLURM_NTASKS": "1"}).world_size == 1  # an interactive allocation, one task
    assert launch_from_environment({}).world_size == 1
    with pytest.raises(ValueError, match="RANK='x'"):
        launch_from_environment({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST or MASTER_ADDR"):
        launch_from_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"})


# ---------------------------------------------------------------------------- fastjepa finetune under torchrun


def finetune(encoder, out, *options):
    return torchrun("-m", "fastjepa", "finetune", "--weights", encoder, "--device", "cpu", "--no-progress", "--per-class", 4, "--out", out,
                    "--set", "data.batch_size=4", "--set", "optimization.epochs=1", "--set", "optimization.warmup_epochs=0.5", *options)


def test_finetune_under_ddp_writes_one_whole_checkpoint(tmp_path, tiny16_encoder):
    done = finetune(tiny16_encoder, tmp_path)
    assert done.stdout.count("fastjepa finetune:") == 1 and "global batch 8" in done.stdout  # rank 0 speaks; 4 images x 2 ranks
    best = read_checkpoint(tmp_path / "finetune-best.pth.tar")
    assert best["encoder"]["patch_embed.proj.weight"].shape == (192, 3, 8, 8) and best["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_finetune_under_fsdp_resumes_exactly(tmp_path, tiny16_encoder):
    fsdp = ("--set", "meta.sharding=fsdp")
    finetune(tiny16_encoder, tmp_path / "straight", *fsdp, "--max-steps", 2)
    finetune(tiny16_encoder, tmp_path / "split", *fsdp, "--max-steps", 1)
    finetune(tiny16_encoder, tmp_path / "split", *fsdp, "--max-steps", 1, "--resume", "auto")
    a = read_checkpoint(tmp_path / "straight" / "finetune-latest.pth.tar")
    b = read_checkpoint(tmp_path / "split" / "finetune-latest.pth.tar")
    assert a["encoder"]["blocks.0.attn.qkv.weight"].shape == (576, 192)  # gathered whole
    for (name, x), (_, y) in zip(tensors({k: a[k] for k in ("encoder", "head", "opt")}), tensors({k: b[k] for k in ("encoder", "head", "opt")})):
        assert torch.equal(x, y), name
