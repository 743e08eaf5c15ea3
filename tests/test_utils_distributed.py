"""fastjepa/utils/distributed.py, the twin of the reference's src/utils/distributed.py:
init_distributed without SLURM, with an existing group and from SLURM's variables (gloo on
the CPU), and AllGather / AllReduceSum / AllReduce forward and backward in 2 gloo processes."""

import logging
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastjepa.utils.distributed import AllGather, AllReduce, AllReduceSum, init_distributed

SLURM = ("SLURM_NTASKS", "SLURM_PROCID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_group():
    """No default group before the test, and none left after it."""
    assert not dist.is_initialized()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_without_slurm_it_is_one_process_and_no_group(monkeypatch, no_group, caplog):
    for name in SLURM:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with caplog.at_level(logging.INFO):
        assert init_distributed() == (1, 0)
    assert not dist.is_initialized()
    assert "SLURM vars not set" in caplog.text
    assert os.environ["MASTER_ADDR"] == "localhost"


def test_an_existing_group_is_reused(tmp_path, monkeypatch, no_group):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", world_size=1, rank=0)
    group = dist.group.WORLD
    monkeypatch.setenv("SLURM_NTASKS", "4")  # ignored: the group is there already
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert init_distributed(port=1, rank_and_world_size=(2, 8)) == (1, 0)
    assert dist.group.WORLD is group and "MASTER_PORT" not in os.environ and "MASTER_ADDR" not in os.environ


def test_slurm_variables_start_a_gloo_group(monkeypatch, no_group):
    port = free_port()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("HOSTNAME", "localhost")
    monkeypatch.setenv("MASTER_ADDR", "elsewhere")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert init_distributed(port=port) == (1, 0)
    assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_rank() == 0
    if not torch.cuda.is_available():
        assert dist.get_backend() == "gloo"
    assert os.environ["MASTER_PORT"] == str(port) and os.environ["MASTER_ADDR"] == "localhost"


def test_a_failed_join_falls_back_to_one_process(monkeypatch, no_group, caplog):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with caplog.at_level(logging.INFO):
        assert init_distributed(port=free_port(), rank_and_world_size=(0, "two")) == (1, 0)  # not an int world size
    assert not dist.is_initialized() and "distributed training not available" in caplog.text


def test_collectives_are_the_identity_without_a_group(no_group):
    x = torch.randn(3, 2, requires_grad=True)
    for op in (AllGather, AllReduceSum, AllReduce):
        y = op.apply(x)
        assert torch.equal(y, x)
        (y * 2).sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, 2.0))
        x.grad = None


def _collectives(rank: int, world_size: int, store: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", world_size=world_size, rank=rank)
    try:
        x = (torch.arange(6.0).reshape(3, 2) + 10 * rank).requires_grad_()
        weights = torch.arange(12.0).reshape(6, 2) * (rank + 1)  # each rank's upstream gradient differs
        gathered = AllGather.apply(x)
        (gathered * weights).sum().backward()
        out = {"gather": gathered.detach(), "gather_grad": x.grad.clone()}
        x.grad = None
        before = x.detach().clone()
        summed = AllReduceSum.apply(x)
        (summed * (rank + 1)).sum().backward()
        out |= {"sum": summed.detach(), "sum_grad": x.grad.clone(), "input_kept": torch.equal(x.detach(), before)}
        x.grad = None
        mean = AllReduce.apply(x)
        (mean * (rank + 1)).sum().backward()
        out |= {"mean": mean.detach(), "mean_grad": x.grad.clone()}
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_collectives_forward_and_backward_in_two_processes(tmp_path):
    world_size = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_collectives, args=(world_size, str(tmp_path / "store"), results), nprocs=world_size, join=True)
        results = dict(results)
    xs = [torch.arange(6.0).reshape(3, 2) + 10 * r for r in range(world_size)]
    weights_sum = sum(torch.arange(12.0).reshape(6, 2) * (r + 1) for r in range(world_size))  # the all-reduced upstream gradient
    for rank in range(world_size):
        out = results[rank]
        assert torch.equal(out["gather"], torch.cat(xs))
        assert torch.equal(out["gather_grad"], weights_sum[3 * rank : 3 * rank + 3])
        assert torch.equal(out["sum"], xs[0] + xs[1]) and out["input_kept"]
        assert torch.equal(out["sum_grad"], torch.full((3, 2), float(rank + 1)))  # identity backward: no reduction
        assert torch.equal(out["mean"], xs[0] / 2 + xs[1] / 2)
        assert torch.equal(out["mean_grad"], torch.full((3, 2), float(rank + 1)))
