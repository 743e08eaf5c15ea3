"""fastjepa's ops: one module per op, each a ``torch.library`` custom op (namespace
``fastjepa``) with a fake implementation and autograd, run by the backend that
``fastjepa.ops.backend`` selects (``torch`` reference, ``triton``, ``cuda``)."""

from fastjepa.ops.attention import shared_context_attention, varlen_attention
from fastjepa.ops.backend import BACKENDS, BackendError, forced_backend, use_backend
from fastjepa.ops.ema import ema_update_
from fastjepa.ops.gather import gather_tokens, pos_tokens
from fastjepa.ops.optim import adamw_ema_

__all__ = [
    "BACKENDS", "BackendError", "adamw_ema_", "ema_update_", "forced_backend", "gather_tokens", "pos_tokens",
    "shared_context_attention", "use_backend", "varlen_attention",
]
