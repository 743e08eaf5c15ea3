"""The opt-in modes ``mask.ragged`` (PackedMasks contexts, packed tokens, varlen attention)
and ``meta.shared_context_predictor`` (one predictor sequence per sample), on the CPU with
the torch attention backend: equality with the dense path (fp64, 1e-10), per-sample
references, the sampler's packed masks, and the trainer end to end."""

import copy
import csv

import pytest
import torch

from fastjepa.masks import MultiBlockMaskSampler, PackedMasks
from fastjepa.models import vision_transformer as vit
from fastjepa.ops import use_backend
from fastjepa.plot import read_log
from fastjepa.step import ContextPredictor, jepa_loss
from fastjepa.train import fit
from fastjepa.utils.masking import concat_packed

GRID, DIM, PRED_DIM, HEADS = 4, 192, 48, 3  # vit_tiny, patch 8 on 32 px: a 4 x 4 grid
TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def torch_backend():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


def fp64_models(depth=2, pred_depth=2, seed=0):
    torch.manual_seed(seed)
    encoder = vit.vit_tiny(img_size=[32], patch_size=8, depth=depth).double()
    predictor = vit.vit_predictor(num_patches=GRID * GRID, embed_dim=DIM, predictor_embed_dim=PRED_DIM, depth=pred_depth,
                                  num_heads=HEADS).double()
    return encoder, predictor


def images(B, seed=1):
    return torch.randn(B, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def idx(*rows):
    return torch.tensor(rows, dtype=torch.int64)


def grads(models):
    return [p.grad.clone() for m in models for p in m.parameters() if p.requires_grad]


def zero_grads(*models):
    for m in models:
        m.zero_grad(set_to_none=True)


# ------------------------------------------------------------------- ragged == dense at equal lengths

CONTEXTS = [idx([0, 1, 2, 5, 8, 12], [1, 3, 4, 6, 9, 14], [2, 5, 7, 8, 11, 13]),
            idx([0, 4, 5, 9, 10, 15], [2, 3, 7, 11, 12, 13], [0, 1, 6, 9, 12, 14])]
TARGETS = [idx([3, 4, 9], [0, 2, 5], [0, 1, 4]), idx([6, 7, 10], [8, 11, 12], [9, 10, 15])]


@pytest.mark.parametrize("nenc", [1, 2])
def test_equal_lengths_ragged_forward_and_gradients_equal_the_dense_path(nenc):
    encoder, predictor = fp64_models()
    x = images(3)
    dense = CONTEXTS[:nenc]
    packed = [PackedMasks.from_dense(m) for m in dense]

    z_dense = predictor(encoder(x, dense), dense, TARGETS)
    z_dense.square().sum().backward()
    g_dense = grads((encoder, predictor))
    zero_grads(encoder, predictor)

    context = encoder(x, packed)
    assert context.shape == (nenc * 3 * 6, DIM)
    torch.testing.assert_close(context, encoder(x, dense).flatten(0, 1), **TOL)
    z_packed = predictor(context, packed, TARGETS)
    assert z_packed.shape == z_dense.shape == (2 * nenc * 3, 3, DIM)
    torch.testing.assert_close(z_packed, z_dense, **TOL)
    z_packed.square().sum().backward()
    for a, b in zip(grads((encoder, predictor)), g_dense):
        torch.testing.assert_close(a, b, **TOL)


# ------------------------------------------------------------------- ragged, unequal lengths

RAGGED = [idx(0, 1, 2, 5, 8, 12, 14), idx(1, 3, 4), idx(2, 5, 7, 8, 11)]  # lengths 7, 3, 5
RAGGED_2 = [idx(4, 5, 9, 10), idx(0, 2, 7, 11, 12, 13), idx(0, 1, 6)]  # a second context mask


@pytest.mark.parametrize("nenc", [1, 2])
def test_ragged_samples_equal_the_dense_model_on_each_sample_alone(nenc):
    encoder, predictor = fp64_models()
    x = images(3)
    rows = [RAGGED, RAGGED_2][:nenc]
    packed = [PackedMasks.from_rows(r) for r in rows]
    assert packed[0].lengths == (7, 3, 5) and packed[0].max_len == 7 and packed[0].cu_seqlens.tolist() == [0, 7, 10, 15]

    context = encoder(x, packed)
    z = predictor(context, packed, TARGETS)
    assert z.shape == (2 * nenc * 3, 3, DIM)
    z.square().sum().backward()
    g_packed = grads((encoder, predictor))
    zero_grads(encoder, predictor)

    context_rows = context.split(concat_packed(packed).lengths)
    total = 0
    for e in range(nenc):
        for b in range(3):
            alone = [rows[e][b][None]]
            single = encoder(x[b : b + 1], alone)
            torch.testing.assert_close(context_rows[e * 3 + b], single[0], **TOL)
            z_b = predictor(single, alone, [t[b : b + 1] for t in TARGETS])  # (M, K, D)
            for i in range(2):
                torch.testing.assert_close(z[(i * nenc + e) * 3 + b], z_b[i], **TOL)
            total = total + z_b.square().sum()
    total.backward()  # the sum over samples of the per-sample losses: the same gradients
    for a, b in zip(g_packed, grads((encoder, predictor))):
        torch.testing.assert_close(a, b, **TOL)


def test_jepa_loss_takes_packed_contexts():
    encoder, predictor = fp64_models()
    target = copy.deepcopy(encoder).requires_grad_(False)
    x = images(3)
    dense = jepa_loss(ContextPredictor(encoder, predictor), target, x, CONTEXTS[:1], TARGETS)
    packed = jepa_loss(ContextPredictor(encoder, predictor), target, x, [PackedMasks.from_dense(CONTEXTS[0])], TARGETS)
    torch.testing.assert_close(packed, dense, **TOL)
    ragged = jepa_loss(ContextPredictor(encoder, predictor), target, x, PackedMasks.from_rows(RAGGED), TARGETS)  # a bare PackedMasks too
    ragged.backward()
    assert torch.isfinite(ragged) and all(torch.isfinite(g).all() for g in grads((encoder, predictor)))


# ------------------------------------------------------------------- shared-context predictor

def masked_block(block, tokens, bias):
    """One pre-norm block on a single (N, D) sequence, attention with an additive mask."""
    attn = block.attn
    N, C = tokens.shape
    h = block.norm1(tokens)
    q, k, v = attn.qkv(h).reshape(N, 3, attn.num_heads, C // attn.num_heads).permute(1, 2, 0, 3)  # (H, N, d) each
    weights = torch.softmax(q @ k.transpose(1, 2) * attn.scale + bias, dim=-1)
    tokens = tokens + attn.proj((weights @ v).transpose(0, 1).reshape(N, C))
    return tokens + block.mlp(block.norm2(tokens))


def shared_context_reference(predictor, context, context_index, target_indices):
    """One sample: [context | block 0 | ... | block M-1], context queries see the context,
    block i's queries the context and block i. Returns (M, K, embed_dim)."""
    pos = predictor.predictor_pos_embed[0]
    L, M, K = len(context_index), len(target_indices), len(target_indices[0])
    parts = [predictor.predictor_embed(context) + pos[context_index]]
    parts += [predictor.mask_token[0, 0] + pos[t] for t in target_indices]
    tokens = torch.cat(parts)
    segment = torch.tensor([0] * L + [1 + i for i in range(M) for _ in range(K)])
    allowed = (segment[None, :] == 0) | (segment[:, None] == segment[None, :])  # [query, key]
    bias = torch.zeros(allowed.shape, dtype=tokens.dtype).masked_fill(~allowed, float("-inf"))
    for block in predictor.predictor_blocks:
        tokens = masked_block(block, tokens, bias)
    return predictor.predictor_proj(predictor.predictor_norm(tokens[L:])).view(M, K, -1)


@pytest.mark.parametrize("contexts", ["dense", "ragged"])
def test_shared_context_predictor_equals_a_masked_per_sample_reference(contexts):
    _, predictor = fp64_models(pred_depth=2)
    B, M = 3, len(TARGETS)
    rows = [c for c in CONTEXTS[0]] if contexts == "dense" else RAGGED
    lengths = [len(r) for r in rows]
    x = torch.randn(sum(lengths), DIM, dtype=torch.float64, requires_grad=True)
    if contexts == "dense":
        masks_x, x_in = [CONTEXTS[0]], x.view(B, lengths[0], DIM)
    else:
        masks_x, x_in = [PackedMasks.from_rows(rows)], x
    z = predictor(x_in, masks_x, TARGETS, shared_context=True)
    assert z.shape == (M * B, 3, DIM)
    weights = torch.randn(z.shape, dtype=torch.float64)
    (z * weights).sum().backward()
    g_x, g_p = x.grad.clone(), grads((predictor,))
    x.grad = None
    zero_grads(predictor)

    total = 0
    for b, context in enumerate(x.split(lengths)):
        want = shared_context_reference(predictor, context, rows[b], [t[b] for t in TARGETS])
        for i in range(M):
            torch.testing.assert_close(z[i * B + b], want[i], **TOL)
            total = total + (want[i] * weights[i * B + b]).sum()
    total.backward()
    torch.testing.assert_close(g_x, x.grad, **TOL)
    for a, b in zip(g_p, grads((predictor,))):
        torch.testing.assert_close(a, b, **TOL)


def test_shared_context_changes_the_model_only_from_the_second_predictor_block():
    """With one block only the mask tokens' outputs are read, and they attend to the same
    keys in both layouts; from two blocks on the context tokens differ."""
    x = images(3)
    for depth, same in ((1, True), (2, False)):
        encoder, predictor = fp64_models(depth=1, pred_depth=depth)
        context = encoder(x, CONTEXTS[:1])
        default = predictor(context, CONTEXTS[:1], TARGETS)
        shared = predictor(context, CONTEXTS[:1], TARGETS, shared_context=True)
        assert torch.allclose(shared, default, rtol=1e-10, atol=1e-10) == same


def test_ragged_shared_context_forward_and_backward_through_the_loss():
    encoder, predictor = fp64_models()
    target = copy.deepcopy(encoder).requires_grad_(False)
    packed = [PackedMasks.from_rows(RAGGED), PackedMasks.from_rows(RAGGED_2)]  # two context masks
    loss = jepa_loss(ContextPredictor(encoder, predictor, shared_context=True), target, images(3), packed, TARGETS)
    loss.backward()
    g = grads((encoder, predictor))
    assert torch.isfinite(loss) and len(g) > 0 and all(torch.isfinite(t).all() for t in g)
    assert predictor.predictor_blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_packed_tokens_refuse_dropout_and_stochastic_depth_in_training():
    block = vit.Block(48, 3, attn_drop=0.1)
    tokens, cu = torch.randn(5, 48), torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="attention dropout"):
        block(tokens, cu, 3)
    block.eval()
    assert block(tokens, cu, 3).shape == (5, 48)
    with pytest.raises(ValueError, match="stochastic depth"):
        vit.Block(48, 3, drop_path=0.1)(tokens, cu, 3)


# ------------------------------------------------------------------- PackedMasks and the sampler

def test_packed_masks_validate_on_the_host():
    index, cu = torch.arange(5), torch.tensor([0, 2, 5], dtype=torch.int32)
    assert PackedMasks(index, cu, 3, (2, 3)).rows == 2
    with pytest.raises(ValueError, match="lengths sum to 6"):
        PackedMasks(index, cu, 3, (2, 4))
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        PackedMasks(index, cu.long(), 3, (2, 3))
    with pytest.raises(ValueError, match="max_len"):
        PackedMasks(index, cu, 2, (2, 3))
    with pytest.raises(ValueError, match="not a mix"):
        vit.VisionTransformer(img_size=[32], patch_size=8, embed_dim=48, depth=1, num_heads=3)(
            images(2).float(), [PackedMasks(index, cu, 3, (2, 3)), torch.zeros(2, 3, dtype=torch.long)])


SAMPLER = dict(input_size=64, patch_size=8, enc_mask_scale=(0.6, 1.0), pred_mask_scale=(0.1, 0.2), aspect_ratio=(0.75, 1.5),
               nenc=1, npred=3, min_keep=4)  # an 8 x 8 grid


def rectangle(indices, width=8):
    rows, cols = indices // width, indices % width
    return {(int(r), int(c)) for r in range(rows.min(), rows.max() + 1) for c in range(cols.min(), cols.max() + 1)}


@pytest.mark.parametrize("allow_overlap", [False, True])
def test_sampler_packs_every_context_token(allow_overlap):
    sampler = MultiBlockMaskSampler(**SAMPLER, allow_overlap=allow_overlap)
    unequal = 0
    for seed in range(30):
        dense_enc, dense_pred = sampler.sample(6, generator=torch.Generator().manual_seed(seed))
        packed_enc, packed_pred = sampler.sample(6, generator=torch.Generator().manual_seed(seed), ragged=True)
        assert all(torch.equal(a, b) for a, b in zip(dense_pred, packed_pred)), "the targets are the dense ones"
        (packed,), (dense,) = packed_enc, dense_enc
        assert isinstance(packed, PackedMasks) and packed.rows == 6
        assert packed.index.dtype == torch.int64 and packed.cu_seqlens.dtype == torch.int32
        assert packed.cu_seqlens.tolist() == [0, *torch.tensor(packed.lengths).cumsum(0).tolist()]
        assert packed.max_len == max(packed.lengths) and min(packed.lengths) == dense.shape[1]
        unequal += len(set(packed.lengths)) > 1
        for b, row in enumerate(packed.split()):
            assert torch.all(row[1:] > row[:-1]), "ascending"
            assert torch.equal(row[: dense.shape[1]], dense[b]), "the dense mask is its truncation"
            targets = torch.cat([m[b] for m in packed_pred])
            cells = {(int(n) // 8, int(n) % 8) for n in row}
            if allow_overlap:  # the untruncated context is the whole square
                assert cells == rectangle(row)
            else:  # disjoint from the targets, and the rectangle minus the targets: nothing dropped
                assert not torch.isin(row, targets).any()
                assert rectangle(row) <= cells | {(int(n) // 8, int(n) % 8) for n in targets}
    assert unequal > 0 or allow_overlap  # truncation would have cut these to one length


def test_ragged_sampling_is_deterministic_and_takes_several_context_masks():
    sampler = MultiBlockMaskSampler(**{**SAMPLER, "nenc": 2})
    def draw(seed):
        return sampler.sample(5, generator=torch.Generator().manual_seed(seed), ragged=True)
    (a, ta), (b, tb), (c, _) = draw(3), draw(3), draw(4)
    assert len(a) == 2 and all(m.rows == 5 for m in a)
    for m, n in zip(a + ta, b + tb):
        if isinstance(m, PackedMasks):
            assert torch.equal(m.index, n.index) and torch.equal(m.cu_seqlens, n.cu_seqlens) and m.lengths == n.lengths
        else:
            assert torch.equal(m, n)
    assert any(m.lengths != n.lengths or not torch.equal(m.index, n.index) for m, n in zip(a, c))
    both = concat_packed(a)
    assert both.rows == 10 and both.lengths == a[0].lengths + a[1].lengths
    assert torch.equal(both.index, torch.cat([a[0].index, a[1].index]))
    assert both.cu_seqlens.tolist() == [0, *torch.tensor(both.lengths).cumsum(0).tolist()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; the CPU path is the same code up to the final copy")
def test_cuda_ragged_masks_equal_cpu_masks_and_sampling_never_syncs():
    sampler = MultiBlockMaskSampler(**SAMPLER)
    cpu_enc, cpu_pred = sampler.sample(64, generator=torch.Generator().manual_seed(3), ragged=True)
    sampler.sample(64, generator=torch.Generator().manual_seed(3), device="cuda", ragged=True)  # warm the pinned-memory cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu_enc, gpu_pred = sampler.sample(64, generator=torch.Generator().manual_seed(3), device="cuda", ragged=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gpu_enc[0].index.is_cuda and gpu_enc[0].cu_seqlens.is_cuda and gpu_enc[0].lengths == cpu_enc[0].lengths
    assert torch.equal(gpu_enc[0].index.cpu(), cpu_enc[0].index) and torch.equal(gpu_enc[0].cu_seqlens.cpu(), cpu_enc[0].cu_seqlens)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu_pred, gpu_pred))


# ------------------------------------------------------------------- the trainer

SMALL = dict(crop_size=48, batch_size=4, repeat=1, pred_depth=2, min_keep=1, epochs=4, warmup=1, progress=False, device="cpu")


@pytest.mark.parametrize("keys", [dict(ragged=True), dict(shared_context_predictor=True), dict(ragged=True, shared_context_predictor=True)],
                         ids=["ragged", "shared-context", "both"])
def test_fit_runs_in_each_mode(tmp_path, keys):
    result = fit(out=tmp_path, max_steps=3, **SMALL, **keys)
    assert result.steps == 3 and all(0 < loss < 10 for loss in result.losses)
    with open(tmp_path / "jepa_r0.csv") as f:
        rows = list(csv.DictReader(f))
    log = read_log(tmp_path / "jepa_r0.csv")  # mask-A stays an integer
    assert len(log["loss"]) == 3 and all(int(r["mask-A"]) > 1 for r in rows)
