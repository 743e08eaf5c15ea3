"""The attention implementations fastjepa's kernels are compared with (benchmarks only).

Each case is packed sequences, or the shared-context layout, as ``AttentionCase``; each peer is
``make(case) -> run`` where ``run()`` returns the output in fastjepa's packed layout (so it
can be checked), or raises ``Unavailable`` at construction with the reason. Optional packages
(flash-attn, xformers) are detected, never required.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastjepa.ops import shared_context_attention, use_backend, varlen_attention


class Unavailable(Exception):
    """This peer cannot run here (the message says why)."""


@dataclass
class AttentionCase:
    name: str
    q: torch.Tensor  # packed (T, H, D), requires grad
    k: torch.Tensor
    v: torch.Tensor
    lengths: list[int]  # varlen: sequence lengths; shared: per sample [context, block 0, ..., block M-1] flattened
    blocks: int  # 0 for varlen, M for the shared-context layout

    @property
    def shared(self) -> bool:
        return self.blocks > 0

    def cu_seqlens(self) -> torch.Tensor:
        return torch.tensor([0] + self.lengths, device=self.q.device).cumsum(0).to(torch.int32)

    def offsets(self) -> torch.Tensor:
        """(B, M + 2) int32 for shared_context_attention."""
        per_sample = self.blocks + 1
        cu = self.cu_seqlens()
        starts = cu[:-1].view(-1, per_sample)
        return torch.cat([starts, cu[per_sample::per_sample].view(-1, 1)], 1).to(torch.int32).contiguous()

    def max_len(self) -> int:
        return max(self.lengths)

    def flops(self) -> int:
        """FlashAttention's convention: 4 * Lq * Lk * H * D per attended pair of ranges (forward)."""
        H, D = self.q.shape[1], self.q.shape[2]
        if not self.shared:
            return sum(4 * n * n * H * D for n in self.lengths)
        total, per_sample = 0, self.blocks + 1
        for s in range(0, len(self.lengths), per_sample):
            ctx, blocks = self.lengths[s], self.lengths[s + 1 : s + per_sample]
            total += 4 * H * D * (ctx * ctx + sum(b * (ctx + b) for b in blocks))
        return total


# ------------------------------------------------------------------------------ fastjepa


def fastjepa(backend: str):
    def make(case: AttentionCase):
        if case.shared:
            offsets, max_len = case.offsets(), case.max_len()

            def run():
                with use_backend(backend):
                    return shared_context_attention(case.q, case.k, case.v, offsets, max_len)
        else:
            cu, max_len = case.cu_seqlens(), case.max_len()

            def run():
                with use_backend(backend):
                    return varlen_attention(case.q, case.k, case.v, cu, max_len)
        return run

    return make


# ------------------------------------------------------------------------ torch peers


def _needs_cuda(case):
    if case.q.device.type != "cuda":
        raise Unavailable("needs a CUDA device")


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        raise Unavailable(f"torch.nn.attention.varlen is missing in torch {torch.__version__} ({e})") from None
    return varlen_attn


def varlen_attn_peer(case: AttentionCase):
    """torch.nn.attention.varlen.varlen_attn (FlashAttention inside PyTorch)."""
    _needs_cuda(case)
    if case.shared:
        raise Unavailable("no shared-context pattern (see the two-call merge)")
    varlen_attn = _varlen_attn()
    cu, max_len = case.cu_seqlens(), case.max_len()
    return lambda: varlen_attn(case.q, case.k, case.v, cu, cu, max_len, max_len)


def sdpa_padded(backend_name: str):
    """SDPA on the sequences padded to the longest one, without a mask: the cost of padding
    alone (an optimistic bound; the padded keys would need a mask to be correct)."""

    def make(case: AttentionCase):
        _needs_cuda(case)
        if case.shared:
            raise Unavailable("no shared-context pattern")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]
        S, B = case.max_len(), len(case.lengths)
        padded = [torch.zeros(B, case.q.shape[1], S, case.q.shape[2], device=case.q.device, dtype=case.q.dtype)
                  for _ in range(3)]
        with torch.no_grad():
            start = 0
            for b, n in enumerate(case.lengths):
                for dst, src in zip(padded, (case.q, case.k, case.v)):
                    dst[b, :, :n] = src[start:start + n].transpose(0, 1)
                start += n
        q, k, v = (t.requires_grad_() for t in padded)

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        run.padded = True  # its output is not in the packed layout: not checked
        run.leaves = (q, k, v)
        try:
            run()
        except RuntimeError as e:
            raise Unavailable(f"SDPA {backend_name} refused these shapes: {str(e).splitlines()[0]}") from None
        return run

    return make


def flex_attention_peer(case: AttentionCase):
    """FlexAttention with a BlockMask built from the layout, under torch.compile."""
    _needs_cuda(case)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, device = case.q.shape[0], case.q.device
    sequence = torch.repeat_interleave(torch.arange(len(case.lengths), device=device), torch.tensor(case.lengths, device=device))
    if case.shared:
        per_sample = case.blocks + 1
        sample, part = sequence // per_sample, sequence % per_sample  # part 0: the context

        def mask_mod(b, h, q_idx, kv_idx):
            same_sample = sample[q_idx] == sample[kv_idx]
            return same_sample & ((part[kv_idx] == 0) | (part[kv_idx] == part[q_idx]))
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return sequence[q_idx] == sequence[kv_idx]

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    compiled = torch.compile(flex_attention)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (case.q, case.k, case.v))  # (1, H, T, D) views
    return lambda: compiled(q, k, v, block_mask=block_mask)[0].transpose(0, 1)


def two_call_merge(case: AttentionCase):
    """Shared context with stock kernels: every block query attends to its sample's context
    (one varlen call over [blocks] x [context]) and to its own block (a second, block-diagonal
    call), merged by log-sum-exp; the context queries need a third call (context only)."""
    _needs_cuda(case)
    if not case.shared:
        raise Unavailable("the shared-context pattern only")
    varlen_attn = _varlen_attn()
    from torch.nn.attention.varlen import AuxRequest

    per_sample, lengths = case.blocks + 1, case.lengths
    contexts = lengths[0::per_sample]
    block_lengths = [n for s in range(0, len(lengths), per_sample) for n in lengths[s + 1 : s + per_sample]]
    block_totals = [sum(lengths[s + 1 : s + per_sample]) for s in range(0, len(lengths), per_sample)]
    device = case.q.device
    cu = torch.tensor([0] + lengths, device=device).cumsum(0)
    is_context = torch.zeros(case.q.shape[0], dtype=torch.bool, device=device)
    for s in range(0, len(lengths), per_sample):
        is_context[cu[s]:cu[s + 1]] = True
    ctx_rows, block_rows = is_context.nonzero().flatten(), (~is_context).nonzero().flatten()

    def cumulative(ns):
        return torch.tensor([0] + ns, device=device).cumsum(0).to(torch.int32)

    cu_ctx, cu_blocks, cu_each = cumulative(contexts), cumulative(block_totals), cumulative(block_lengths)
    max_ctx, max_blocks, max_each = max(contexts), max(block_totals), max(block_lengths)
    # the favourable layout for this peer: contexts packed together, blocks packed together
    qc, kc, vc = (t.detach()[ctx_rows].requires_grad_() for t in (case.q, case.k, case.v))
    qb, kb, vb = (t.detach()[block_rows].requires_grad_() for t in (case.q, case.k, case.v))
    lse_request = AuxRequest(lse=True)

    def run():
        out_ctx = varlen_attn(qc, kc, vc, cu_ctx, cu_ctx, max_ctx, max_ctx)
        a, lse_a = varlen_attn(qb, kc, vc, cu_blocks, cu_ctx, max_blocks, max_ctx, return_aux=lse_request)
        b, lse_b = varlen_attn(qb, kb, vb, cu_each, cu_each, max_each, max_each, return_aux=lse_request)
        lse_a, lse_b = (x.transpose(0, 1).unsqueeze(-1).float() for x in (lse_a, lse_b))  # (T, H, 1)
        m = torch.maximum(lse_a, lse_b)
        wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
        out_blocks = ((a.float() * wa + b.float() * wb) / (wa + wb)).to(a.dtype)
        out = torch.empty_like(case.q)
        out[ctx_rows], out[block_rows] = out_ctx, out_blocks
        return out

    run.leaves = (qc, kc, vc, qb, kb, vb)
    return run


def flash_attn_peer(case: AttentionCase):
    """flash-attn's flash_attn_varlen_func, when the package is installed."""
    _needs_cuda(case)
    if case.shared:
        raise Unavailable("no shared-context pattern")
    try:
        flash_attn = importlib.import_module("flash_attn")
    except ImportError:
        raise Unavailable("flash-attn is not installed") from None
    cu, max_len = case.cu_seqlens(), case.max_len()
    return lambda: flash_attn.flash_attn_varlen_func(case.q, case.k, case.v, cu, cu, max_len, max_len)


def xformers_peer(case: AttentionCase):
    """xformers memory_efficient_attention with a BlockDiagonalMask, when installed."""
    _needs_cuda(case)
    if case.shared:
        raise Unavailable("no shared-context pattern")
    try:
        xops = importlib.import_module("xformers.ops")
        fmha = importlib.import_module("xformers.ops.fmha")
    except ImportError:
        raise Unavailable("xformers is not installed") from None
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(case.lengths)
    q, k, v = (t.unsqueeze(0) for t in (case.q, case.k, case.v))
    return lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias)[0]


PEERS = {
    "fastjepa triton": fastjepa("triton"),
    "fastjepa torch": fastjepa("torch"),
    "varlen_attn": varlen_attn_peer,
    "sdpa padded flash": sdpa_padded("flash"),
    "sdpa padded efficient": sdpa_padded("efficient"),
    "sdpa padded cudnn": sdpa_padded("cudnn"),
    "flex_attention (compiled)": flex_attention_peer,
    "two-call merge (varlen_attn)": two_call_merge,
    "flash_attn_varlen_func": flash_attn_peer,
    "xformers BlockDiagonalMask": xformers_peer,
}
