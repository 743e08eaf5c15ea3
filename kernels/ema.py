"""Multi-tensor EMA: ``target <- m * target + (1 - m) * online`` over many tensors in one launch.

The tensors are reached through tables of int64 addresses (one entry per tensor); the work
is cut into CHUNK-element chunks, one program per chunk, so one launch covers a whole model
whatever its tensor sizes. The momentum is read from a 0-d fp32 device tensor: changing it
costs no host sync and no recompile. The target is fp32; ``online`` may be fp32, bf16 or
fp16; with a shadow, the new target is also written in the shadow's dtype in the same pass.
"""

import torch
import triton
import triton.language as tl

CHUNK = 16384
BLOCK = 1024

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _ema_chunks(
    chunk_tensor_ptr, chunk_start_ptr, numel_ptr, target_addr_ptr, online_addr_ptr, shadow_addr_ptr, momentum_ptr,
    ONLINE_DTYPE: tl.constexpr, SHADOW_DTYPE: tl.constexpr, HAS_SHADOW: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    i = tl.load(chunk_tensor_ptr + chunk)
    start = tl.load(chunk_start_ptr + chunk)
    numel = tl.load(numel_ptr + i)
    target = tl.load(target_addr_ptr + i).to(tl.pointer_type(tl.float32))
    online = tl.load(online_addr_ptr + i).to(tl.pointer_type(ONLINE_DTYPE))
    m = tl.load(momentum_ptr).to(tl.float32)
    for offset in tl.range(0, CHUNK, BLOCK):
        o = start + offset + tl.arange(0, BLOCK)
        mask = o < numel
        t = tl.load(target + o, mask=mask)
        v = tl.load(online + o, mask=mask).to(tl.float32)
        new = m * t + (1.0 - m) * v
        tl.store(target + o, new, mask=mask)
        if HAS_SHADOW:
            shadow = tl.load(shadow_addr_ptr + i).to(tl.pointer_type(SHADOW_DTYPE))
            tl.store(shadow + o, new.to(SHADOW_DTYPE), mask=mask)


class ChunkTable:
    """Device tables of addresses and chunks for one list of tensors (rebuilt only when the
    tensors' addresses or sizes change)."""

    def __init__(self, targets, onlines, shadows, device):
        numels = [t.numel() for t in targets]
        chunk_tensor, chunk_start = [], []
        for i, n in enumerate(numels):
            starts = range(0, n, CHUNK)
            chunk_tensor.extend([i] * len(starts))
            chunk_start.extend(starts)

        def table(values):
            return torch.tensor(values, dtype=torch.int64).to(device)

        self.chunk_tensor = table(chunk_tensor)
        self.chunk_start = table(chunk_start)
        self.numel = table(numels)
        self.target = table([t.data_ptr() for t in targets])
        self.online = table([t.data_ptr() for t in onlines])
        self.shadow = table([t.data_ptr() for t in shadows]) if shadows else self.target
        self.online_dtype = _TL_DTYPES[onlines[0].dtype]
        self.shadow_dtype = _TL_DTYPES[shadows[0].dtype] if shadows else tl.float32
        self.has_shadow = bool(shadows)


_tables: dict[tuple, ChunkTable] = {}
_MAX_TABLES = 16


def ema_update(targets, onlines, shadows, momentum) -> None:
    """One launch over all tensors. Inputs validated by ``fastjepa.ops.ema``: contiguous,
    same shapes, one device, fp32 targets, one online dtype, one shadow dtype."""
    if not targets or sum(t.numel() for t in targets) == 0:
        return
    key = tuple((t.data_ptr(), t.numel()) for group in (targets, onlines, shadows) for t in group)
    key += (str(onlines[0].dtype), str(shadows[0].dtype) if shadows else None)
    table = _tables.get(key)
    if table is None:
        if len(_tables) >= _MAX_TABLES:
            _tables.pop(next(iter(_tables)))
        table = _tables[key] = ChunkTable(targets, onlines, shadows, targets[0].device)
    grid = (table.chunk_tensor.numel(),)
    _ema_chunks[grid](
        table.chunk_tensor, table.chunk_start, table.numel, table.target, table.online, table.shadow, momentum,
        ONLINE_DTYPE=table.online_dtype, SHADOW_DTYPE=table.shadow_dtype, HAS_SHADOW=table.has_shadow,
        CHUNK=CHUNK, BLOCK=BLOCK,
    )
