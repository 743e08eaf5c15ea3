"""One full I-JEPA step of ``fastjepa.step.train_step`` against a hand-written float64 reference.

The models are ``vit_tiny`` (patch 8 on 32x32 images: a 4x4 grid of 16 tokens) with a
2-block predictor, converted to float64. The reference below never calls fastjepa's
forward, ``apply_masks``, ``repeat_interleave_batch``, schedulers or optimizer: it
reads the parameters from the state_dicts and redoes, in plain tensor algebra,
the context / target encoders, the predictor, the smooth-L1 loss, the lr / wd /
momentum closed forms, AdamW's first step and the EMA.

Tolerances: the loss must agree to 1e-10 relative; every encoder, predictor and
target-encoder parameter after the step to rtol=1e-9, atol=1e-12 (float64 leaves
about 1e-16 of rounding noise; anything above 1e-9 is a real difference).
"""

import copy
import math

import pytest
import torch

from fastjepa.helper import init_model, init_opt
from fastjepa.masks import PackedMasks
from fastjepa.step import ContextPredictor, train_step
from fastjepa.utils.schedulers import MomentumSchedule

PATCH, CROP, HEADS = 8, 32, 3  # vit_tiny: embed 192, 3 heads; the predictor uses the encoder's heads
IPE, WARMUP, EPOCHS, START_LR, REF_LR, WD, FINAL_WD = 10, 1, 2, 1e-3, 2e-3, 0.04, 0.4
EMA = (0.9, 1.0)
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


# ----------------------------------------------------------------------------- reference math
def linear(x, P, name):
    return x @ P[name + ".weight"].T + P[name + ".bias"]


def layer_norm(x, eps, weight=None, bias=None):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def attention(x, P, name):
    B, N, D = x.shape
    hd = D // HEADS
    qkv = linear(x, P, name + ".qkv").reshape(B, N, 3, HEADS, hd)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, hd)
    scores = q @ k.transpose(-1, -2) * hd**-0.5
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    out = (e / e.sum(-1, keepdim=True)) @ v
    return linear(out.transpose(1, 2).reshape(B, N, D), P, name + ".proj")


def blocks(x, P, prefix):
    depth = len({k.split(".")[1] for k in P if k.startswith(prefix + ".")})
    for layer in range(depth):
        n = f"{prefix}.{layer}."
        x = x + attention(layer_norm(x, 1e-6, P[n + "norm1.weight"], P[n + "norm1.bias"]), P, n + "attn")
        h = layer_norm(x, 1e-6, P[n + "norm2.weight"], P[n + "norm2.bias"])
        x = x + linear(gelu_erf(linear(h, P, n + "mlp.fc1")), P, n + "mlp.fc2")
    return x


def gather(x, masks):
    """Mask-major: row i * B + b is sample b's tokens under mask i."""
    return torch.stack([x[b, m[b]] for m in masks for b in range(len(m))])


def repeat_chunks(x, B, r):
    return torch.cat([chunk for chunk in x.split(B) for _ in range(r)])


def encoder_fwd(P, imgs, masks=None):
    B, C, H, W = imgs.shape
    g = H // PATCH  # patch (r, c) -> token r * g + c, channels flattened as (C, kh, kw) like the conv kernel
    patches = imgs.reshape(B, C, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * PATCH * PATCH)
    w = P["patch_embed.proj.weight"]
    x = patches @ w.reshape(w.shape[0], -1).T + P["patch_embed.proj.bias"]
    x = x + P["pos_embed"][0]
    if masks is not None:
        x = gather(x, masks)
    return layer_norm(blocks(x, P, "blocks"), 1e-6, P["norm.weight"], P["norm.bias"])


def predictor_fwd(Q, ctx, masks_enc, masks_pred, B):
    pos = Q["predictor_pos_embed"][0]
    x = linear(ctx, Q, "predictor_embed") + gather(pos.expand(B, *pos.shape), masks_enc)
    out = []
    for mt in masks_pred:  # target-mask-major, then context mask, then sample
        tokens = Q["mask_token"] + torch.stack([pos[mt[b]] for b in range(B)])
        for j in range(len(masks_enc)):
            seq = blocks(torch.cat([x[j * B : (j + 1) * B], tokens], dim=1), Q, "predictor_blocks")
            seq = layer_norm(seq, 1e-6, Q["predictor_norm.weight"], Q["predictor_norm.bias"])
            out.append(linear(seq[:, -mt.shape[1] :], Q, "predictor_proj"))
    return torch.cat(out)


def reference_loss(E, Q, T, imgs, masks_enc, masks_pred):
    B = len(imgs)
    h = layer_norm(encoder_fwd(T, imgs), 1e-5)  # no affine, eps 1e-5
    h = repeat_chunks(gather(h, masks_pred), B, len(masks_enc))
    z = predictor_fwd(Q, encoder_fwd(E, imgs, masks_enc), masks_enc, masks_pred, B)
    d = z - h
    return torch.where(d.abs() < 1, 0.5 * d**2, d.abs() - 0.5).mean()


def adamw_first_step(name, p, g, lr, wd):
    decay = wd if ("bias" not in name and p.dim() != 1) else 0.0
    p = p * (1 - lr * decay)
    m_hat = (1 - BETA1) * g / (1 - BETA1)
    v_hat = (1 - BETA2) * g * g / (1 - BETA2)
    return p - lr * m_hat / (torch.sqrt(v_hat) + ADAM_EPS)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def as_leaves(model, snap):
    """Copies of the snapshot, as autograd leaves where the model's parameter is trainable."""
    return {n: snap[n].clone().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- the test
def _idx(*rows):
    return torch.tensor(rows, dtype=torch.int64)


CASES = {
    "B3": (
        [_idx([0, 1, 2, 5, 8, 12, 15], [1, 3, 4, 6, 9, 10, 14], [2, 5, 7, 8, 11, 13, 14])],
        [_idx([3, 4, 9, 10], [0, 2, 5, 7], [0, 1, 4, 6]),
         _idx([6, 7, 10, 11], [8, 11, 12, 13], [9, 10, 12, 15]),
         _idx([9, 11, 13, 14], [0, 5, 12, 15], [3, 4, 6, 10])],
    ),
    "B1": ([_idx([0, 3, 5, 6, 9, 12, 15])], [_idx([1, 2, 4, 7]), _idx([8, 10, 11, 13])]),
}


@pytest.fixture(scope="module")
def fp64_models():
    """Fresh random init once per module; each case works on deep copies. One intra-op
    thread: these ops are tiny, and OpenMP threads on a busy CPU make them 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder, predictor = init_model("cpu", patch_size=PATCH, model_name="vit_tiny", crop_size=CROP,
                                        pred_depth=2, pred_emb_dim=48)
        yield encoder.double(), predictor.double()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_train_step_matches_handwritten_fp64_reference(case, packed, fp64_models):
    """packed: the contexts as PackedMasks of equal lengths (the mask.ragged path: packed
    tokens, varlen attention) against the same dense reference."""
    masks_enc, masks_pred = CASES[case]
    B = masks_enc[0].shape[0]
    encoder, predictor = (copy.deepcopy(m) for m in fp64_models)
    target_encoder = copy.deepcopy(encoder)
    for p in target_encoder.parameters():
        p.requires_grad_(False)
    optimizer, _, lr_sched, wd_sched = init_opt(encoder, predictor, iterations_per_epoch=IPE, start_lr=START_LR,
                                                ref_lr=REF_LR, warmup=WARMUP, num_epochs=EPOCHS, wd=WD,
                                                final_wd=FINAL_WD, ipe_scale=1.0)
    momentum_sched = MomentumSchedule(*EMA, IPE * EPOCHS)
    imgs = torch.randn(B, 3, CROP, CROP, dtype=torch.float64)  # fresh random data every run

    # ---- reference, computed from snapshots taken before the step
    E, Q, T = snapshot(encoder), snapshot(predictor), snapshot(target_encoder)
    E_in, Q_in = as_leaves(encoder, E), as_leaves(predictor, Q)
    trainable = [(which, n, t) for which, d in (("E", E_in), ("Q", Q_in)) for n, t in d.items() if t.requires_grad]
    ref_loss = reference_loss(E_in, Q_in, T, imgs, masks_enc, masks_pred)
    grads = torch.autograd.grad(ref_loss, [t for _, _, t in trainable])

    W, total = WARMUP * IPE, EPOCHS * IPE
    lr = START_LR + (1 / W) * (REF_LR - START_LR)  # step 1 of the warmup (1 < W)
    wd = FINAL_WD + (WD - FINAL_WD) * 0.5 * (1 + math.cos(math.pi * 1 / total))
    mom = EMA[0]  # first value of the momentum schedule
    new = {"E": dict(E), "Q": dict(Q)}
    for (which, n, t), g in zip(trainable, grads):
        new[which][n] = adamw_first_step(n, t.detach(), g, lr, wd)
    new_T = {n: mom * T[n] + (1 - mom) * new["E"][n] for n in T}
    moved = {(which, n) for which, n, _ in trainable}

    # ---- the implementation under test
    step_masks = [PackedMasks.from_dense(m) for m in masks_enc] if packed else masks_enc
    result = train_step(ContextPredictor(encoder, predictor), target_encoder, optimizer, lr_sched, wd_sched, momentum_sched,
                        imgs, step_masks, masks_pred)

    assert result.lr == pytest.approx(lr, rel=1e-15) and result.wd == pytest.approx(wd, rel=1e-15)
    assert result.momentum == pytest.approx(mom, rel=1e-15)
    assert torch.isfinite(ref_loss) and ref_loss > 0 and torch.isfinite(result.loss)
    # loss: 1e-10 relative
    torch.testing.assert_close(result.loss.double(), ref_loss.detach(), rtol=1e-10, atol=0.0,
                               msg=lambda m: f"loss (train_step returned {result.loss.dtype}): {m}")

    for label, model, expected, before in (("encoder", encoder, new["E"], E), ("predictor", predictor, new["Q"], Q),
                                           ("target_encoder", target_encoder, new_T, T)):
        step = lr if label != "target_encoder" else (1 - mom) * lr
        for n, got in model.state_dict().items():
            assert torch.isfinite(got).all(), f"{label}.{n} has non-finite values"
            # parameters: rtol 1e-9, atol 1e-12 (allclose first: same test, much cheaper than assert_close)
            if not torch.allclose(got, expected[n], rtol=1e-9, atol=1e-12):
                torch.testing.assert_close(got, expected[n], rtol=1e-9, atol=1e-12,
                                           msg=lambda m: f"{label}.{n}: {m}")
            if ("Q" if label == "predictor" else "E", n) in moved:  # the step is not a no-op
                assert (got - before[n]).abs().max() > 0.5 * step, f"{label}.{n} did not move"


def test_bf16_autocast_steps_run_in_fp32_loss_and_learn_a_fixed_batch():
    torch.manual_seed(0)
    encoder, predictor = init_model("cpu", patch_size=PATCH, model_name="vit_tiny", crop_size=CROP, pred_depth=1, pred_emb_dim=48)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    optimizer, _, lr_sched, wd_sched = init_opt(encoder, predictor, iterations_per_epoch=100, start_lr=1e-3, ref_lr=1e-3,
                                                warmup=0, num_epochs=1, wd=0.0, final_wd=0.0, ipe_scale=1.0)
    momentum_sched = MomentumSchedule(0.99, 1.0, 100)
    masks_enc, masks_pred = CASES["B3"]
    imgs = torch.randn(3, 3, CROP, CROP)
    losses = [train_step(ContextPredictor(encoder, predictor), target_encoder, optimizer, lr_sched, wd_sched, momentum_sched,
                         imgs, masks_enc, masks_pred, use_bfloat16=True).loss for _ in range(8)]
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def tiny_training(wd: float, ema_start: float):
    """A seeded ViT-tiny pair with its target, AdamW (constant lr 1e-3, weight decay ``wd``) and
    the three schedules: (encoder, predictor, target, optimizer, lr, wd, momentum)."""
    torch.manual_seed(0)
    encoder, predictor = init_model("cpu", patch_size=PATCH, model_name="vit_tiny", crop_size=CROP, pred_depth=1, pred_emb_dim=48)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    optimizer, _, lr_sched, wd_sched = init_opt(encoder, predictor, iterations_per_epoch=100, start_lr=1e-3, ref_lr=1e-3,
                                                warmup=0, num_epochs=1, wd=wd, final_wd=wd, ipe_scale=1.0)
    return encoder, predictor, target_encoder, optimizer, lr_sched, wd_sched, MomentumSchedule(ema_start, 1.0, 100)


def test_bf16_target_shadow_gives_the_same_steps_as_autocast_casting_the_fp32_target():
    """The shadow only saves autocast's weight casts: losses and every weight (fp32 target
    included) equal the plain bf16-autocast run bit for bit, and the shadow holds the
    target rounded to bf16 after each step."""
    from fastjepa.models.shadow import Bf16Shadow

    runs = []
    for with_shadow in (False, True):
        encoder, predictor, target_encoder, optimizer, lr_sched, wd_sched, momentum_sched = tiny_training(wd=0.04, ema_start=0.9)
        shadow = Bf16Shadow(target_encoder, encoder) if with_shadow else None
        masks_enc, masks_pred = CASES["B3"]
        imgs = torch.randn(3, 3, CROP, CROP, generator=torch.Generator().manual_seed(1))
        losses = [train_step(ContextPredictor(encoder, predictor), target_encoder, optimizer, lr_sched, wd_sched, momentum_sched,
                             imgs, masks_enc, masks_pred, use_bfloat16=True, target_shadow=shadow).loss for _ in range(3)]
        runs.append((losses, target_encoder.state_dict(), shadow))
    (plain_losses, plain_target, _), (shadow_losses, shadow_target, shadow) = runs
    assert torch.equal(torch.stack(plain_losses), torch.stack(shadow_losses))
    for name, value in plain_target.items():
        assert torch.equal(value, shadow_target[name]), name
    shadow_params = dict(shadow.module.named_parameters())
    bf16 = [n for n, p in shadow_params.items() if p.dtype == torch.bfloat16]
    assert "patch_embed.proj.weight" in bf16 and "blocks.0.attn.qkv.weight" in bf16 and "norm.weight" not in bf16
    for name in bf16:
        assert torch.equal(shadow_params[name], shadow_target[name].to(torch.bfloat16)), name
    assert shadow_params["norm.weight"].data_ptr() == shadow_target["norm.weight"].data_ptr()  # shared, not copied


def test_a_nonfinite_loss_or_gradient_leaves_weights_moments_and_target_as_they_were():
    torch.manual_seed(0)
    encoder, predictor = init_model("cpu", patch_size=PATCH, model_name="vit_tiny", crop_size=CROP, pred_depth=1, pred_emb_dim=48)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    model = ContextPredictor(encoder, predictor)
    optimizer, _, lr_sched, wd_sched = init_opt(encoder, predictor, iterations_per_epoch=100, start_lr=1e-3, ref_lr=1e-3,
                                                warmup=0, num_epochs=1, wd=0.04, final_wd=0.04, ipe_scale=1.0)
    momentum_sched = MomentumSchedule(0.9, 1.0, 100)
    masks_enc, masks_pred = CASES["B3"]

    def step(imgs):
        return train_step(model, target_encoder, optimizer, lr_sched, wd_sched, momentum_sched, imgs, masks_enc, masks_pred)

    def snapshot():
        return copy.deepcopy([model.state_dict(), target_encoder.state_dict(), optimizer.state_dict()["state"]])

    def assert_unchanged(before):
        after = snapshot()
        for old, new in zip(before[:2], after[:2]):
            assert all(torch.equal(old[k], new[k]) for k in old)
        assert all(torch.equal(before[2][i][k], after[2][i][k]) for i in before[2] for k in before[2][i])
        assert all(p.grad is None for p in model.parameters())  # nothing left over for the next step

    assert step(torch.randn(3, 3, CROP, CROP)).nonfinite is None  # the moments exist from here on
    before = snapshot()
    imgs = torch.randn(3, 3, CROP, CROP)
    imgs[1, 0, 5, 7] = float("nan")
    result = step(imgs)
    assert result.nonfinite.startswith("loss is nan") and "non-finite gradients" in result.nonfinite
    assert_unchanged(before)

    hook = predictor.predictor_embed.weight.register_hook(lambda g: g * float("inf"))  # a finite loss, one bad gradient
    result = step(torch.randn(3, 3, CROP, CROP))
    hook.remove()
    assert result.nonfinite == "non-finite gradients in 1 tensors (predictor.predictor_embed.weight)"
    assert_unchanged(before)
    assert step(torch.randn(3, 3, CROP, CROP)).nonfinite is None  # and training goes on
    assert any(not torch.equal(before[0][k], v) for k, v in model.state_dict().items())


def test_the_phase_hook_wraps_every_phase_in_order_and_changes_nothing():
    """Two identical runs of two steps, one with a recording hook: the same losses and weights,
    and the hook saw each step's seven phases in the step's order."""
    import contextlib

    seen = []

    @contextlib.contextmanager
    def record(name):
        seen.append(name)
        yield

    runs = []
    for phase in (None, record):
        encoder, predictor, target_encoder, optimizer, lr_sched, wd_sched, momentum_sched = tiny_training(wd=0.0, ema_start=0.99)
        model = ContextPredictor(encoder, predictor)
        masks_enc, masks_pred = CASES["B3"]
        imgs = torch.randn(3, 3, CROP, CROP)
        hook = {"phase": phase} if phase else {}
        losses = [train_step(model, target_encoder, optimizer, lr_sched, wd_sched, momentum_sched, imgs, masks_enc, masks_pred,
                             **hook).loss for _ in range(2)]
        runs.append((losses, [p.detach().clone() for p in target_encoder.parameters()]))
    order = ["target forward", "context forward", "predictor", "loss", "backward", "optimizer", "ema"]
    assert seen == order * 2
    (losses_a, target_a), (losses_b, target_b) = runs
    assert [float(x) for x in losses_a] == [float(x) for x in losses_b]
    assert all(torch.equal(a, b) for a, b in zip(target_a, target_b))
