"""torch.distributed for the trainer: the process group from torchrun or SLURM, DDP or FSDP2
around the context encoder and predictor, and full (reference-format) state for checkpoints.

Launch: ``torchrun --nproc-per-node N -m fastjepa train ...`` (many nodes through torchrun's
rendezvous), or ``srun`` under SLURM with one task per GPU (the rank, world size and
rendezvous address come from SLURM's variables). NCCL on GPUs, gloo on CPUs.

``meta.sharding: ddp`` (the default): one DistributedDataParallel over the encoder and the
predictor (one reducer, static graph); the target encoder is not wrapped (it has no
gradients) and every rank applies the same EMA to the same weights.
``meta.sharding: fsdp``: FSDP2 (``fully_shard``) per transformer block and at the root, the
target encoder sharded the same way, so the EMA runs on each rank's local shards. Checkpoints
gather every tensor into the reference's format on save, and shard it again on load.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from fastjepa.models.vision_transformer import transformer_blocks  # the blocks FSDP2 shards one by one


@dataclass(frozen=True)
class Launch:
    """Where this process sits: rank, world size, rank within its node, and the rendezvous."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None  # None: already in the environment (torchrun sets it)
    master_port: int | None = None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise ValueError(f"cannot read a host from SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int_env(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def launch_from_environment(env=None) -> Launch:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; else SLURM's SLURM_PROCID / SLURM_NTASKS /
    SLURM_LOCALID with the first host of SLURM_JOB_NODELIST as the rendezvous (port
    MASTER_PORT, else 20000 + job id mod 20000, the same on every task); else one process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(_int_env(env, "RANK"), _int_env(env, "WORLD_SIZE"), _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world_size = _int_env(env, "SLURM_NTASKS")
        if world_size == 1:
            return Launch(0, 1, 0)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist and "MASTER_ADDR" not in env:
            raise ValueError("SLURM task without SLURM_JOB_NODELIST or MASTER_ADDR: cannot find the rendezvous host")
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + _int_env(env, "SLURM_JOB_ID") % 20000
        return Launch(_int_env(env, "SLURM_PROCID"), world_size, _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                      env.get("MASTER_ADDR") or first_host(nodelist), port)
    return Launch(0, 1, 0)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def setup(device: str | torch.device | None) -> tuple[torch.device, bool]:
    """Join the process group the environment describes (when it describes one and none is
    up yet) and pick this process's device: ``cuda`` means ``cuda:LOCAL_RANK``. Returns the
    device and whether this call started the group (the trainer then ends it)."""
    launch = launch_from_environment()
    try:
        requested = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if requested.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: this torch build or machine has no CUDA device; use cpu")
    if launch.world_size == 1 and not dist.is_initialized():
        return requested, False
    if requested.type == "cuda":
        if requested.index is not None and launch.world_size > 1:
            raise ValueError(f"--device {requested} names one GPU, but {launch.world_size} processes share the node: "
                             f"give --device cuda (each process takes cuda:LOCAL_RANK)")
        requested = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(requested)
    if dist.is_initialized():
        return requested, False
    if launch.master_addr is not None:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = launch.master_addr, str(launch.master_port)
    global _host_group
    if requested.type == "cuda":
        dist.init_process_group("nccl", rank=launch.rank, world_size=launch.world_size, device_id=requested)
        _host_group = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size)
    return requested, True


def teardown() -> None:
    """End the process group ``setup`` started."""
    global _host_group
    _host_group = None
    dist.destroy_process_group()


# Flags decided on the host (a preemption notice, an empty batch) are all-reduced over gloo:
# over NCCL they would wait for every kernel queued before them, a GPU drain every step.
_host_group = None  # set by setup() when it starts NCCL; otherwise the default group serves


def any_rank(*flags: bool, device: torch.device) -> tuple[bool, ...]:
    """Each flag or'ed over the ranks (one collective: every rank must call it)."""
    if not is_distributed():
        return flags
    on_host = _host_group is not None or dist.get_backend() == "gloo"
    values = torch.tensor([int(flag) for flag in flags], device="cpu" if on_host else device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=_host_group)
    return tuple(bool(v) for v in values.tolist())


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (a picklable object, e.g. the run folder's path)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; over gloo, no GPU involved."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=_host_group)
    return gathered


def any_rank_tensor(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (a 0-d bool or int tensor) or'ed over the ranks, still on the device."""
    if not is_distributed():
        return flag
    value = flag.to(torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.bool()


# ---------------------------------------------------------------------------- wrapping


def wrap(model: nn.Module, target_encoder: nn.Module, meta: dict, device: torch.device, accumulating: bool = False) -> nn.Module:
    """``model`` (a ContextPredictor: the encoder and the predictor) under DDP or FSDP2, as
    ``meta.sharding`` says; ``target_encoder`` is sharded in place like the encoder under
    FSDP2 and left alone under DDP. One process: ``model`` itself. ``accumulating`` (gradient
    accumulation): DDP without ``static_graph``, whose reducer fails under ``no_sync``."""
    if not is_distributed():
        return model
    if meta["sharding"] == "fsdp":
        if meta["grad_reduce_dtype"] != "float32":
            raise ValueError("meta.grad_reduce_dtype bfloat16 is a DDP option; FSDP2 reduces in the gradients' dtype")
        return _fully_shard(model, device, (model.encoder, model.predictor, target_encoder), followers=(target_encoder,))
    ddp = _ddp(model, device, meta["ddp_bucket_mb"], accumulating)
    if meta["grad_reduce_dtype"] == "bfloat16":
        ddp.register_comm_hook(None, bf16_allreduce_hook)
    return ddp


def wrap_model(model: nn.Module, sharding: str, device: torch.device, accumulating: bool = False) -> nn.Module:
    """A model whose transformer blocks are its ``encoder``'s (a fine-tuned classifier) under
    DDP or FSDP2 (``sharding``: ddp or fsdp); one process: ``model`` itself."""
    if not is_distributed():
        return model
    if sharding == "fsdp":
        return _fully_shard(model, device, (model.encoder,))
    return _ddp(model, device, DDP_BUCKET_MB, accumulating)


DDP_BUCKET_MB = 25  # DDP's default bucket size


def _fully_shard(model: nn.Module, device: torch.device, roots, followers=()) -> nn.Module:
    """FSDP2 in place: every transformer block of ``roots`` its own unit, each of ``followers``
    (no gradients: the target encoder) a root resharded after its forward, then ``model``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for root in roots:
        for block in transformer_blocks(root):
            fully_shard(block, mesh=mesh)
    for follower in followers:
        fully_shard(follower, mesh=mesh, reshard_after_forward=True)  # a root keeps its weights whole after forward unless told
    fully_shard(model, mesh=mesh)
    return model


def _ddp(model: nn.Module, device: torch.device, bucket_mb: float, accumulating: bool) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=bucket_mb,
                                   static_graph=not accumulating, broadcast_buffers=False)


def bf16_allreduce_hook(group, bucket):  # no annotations: DDP compares them with objects, not strings
    """A DDP communication hook: each gradient bucket is averaged in bf16 (half the bytes of
    fp32) and written back in fp32. torch's own bf16_compress_hook does this on NCCL only;
    this one also runs on gloo, so the CPU tests cover it."""
    group = group if group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    reduced = buffer.to(torch.bfloat16).div_(group.size())
    future = dist.all_reduce(reduced, group=group, async_op=True).get_future()

    def write_back(done: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(done.value()[0])
        return buffer

    return future.then(write_back)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Within it, a backward reduces gradients across ranks only when ``enabled``: DDP's
    ``no_sync`` or FSDP2's ``set_requires_gradient_sync(False)`` otherwise (gradient
    accumulation: every micro-batch but the last). A module under neither: nothing to switch."""
    from torch.distributed.fsdp import FSDPModule

    if not enabled and isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif not enabled and isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 changes modules in place: no wrapper)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 tensor (a view: writes reach the parameter); other tensors as they are."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# ---------------------------------------------------------------------------- checkpoints


def full_state(state):
    """``state`` (a state_dict, nested dicts and lists) with every sharded tensor gathered
    whole, on the CPU: what the reference's checkpoint holds. A collective under FSDP2:
    every rank calls it; unsharded tensors stay as they are."""
    if isinstance(state, DTensor):
        return state.full_tensor().cpu()
    if isinstance(state, dict):
        return {key: full_state(value) for key, value in state.items()}
    if isinstance(state, list):
        return [full_state(value) for value in state]
    return state


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full (reference-format) optimizer state_dict, its per-parameter tensors sharded like
    the optimizer's FSDP2 parameters, ready for ``optimizer.load_state_dict``. Unsharded
    parameters keep their tensors."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, entry in state.get("state", {}).items():
        param = params[index] if isinstance(index, int) and 0 <= index < len(params) else None
        if not isinstance(param, DTensor):
            sharded[index] = entry
            continue
        sharded[index] = {
            key: distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            if isinstance(value, torch.Tensor) and value.shape == param.shape else value
            for key, value in entry.items()
        }
    return {**state, "state": sharded}
