"""The ViT encoder and predictor: shapes, parameter counts, state_dict keys, init,
attention numerics (fp64 manual softmax reference), position tables, bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastjepa.helper import init_model
from fastjepa.models import vision_transformer as vit

FACTORIES = ["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant"]
# (embed_dim, depth, heads, patch size, encoder parameters without pos_embed in millions, to 0.1 M)
SHAPES = {
    "vit_tiny": (192, 12, 3, 16, 5.5),
    "vit_small": (384, 12, 6, 16, 21.6),
    "vit_base": (768, 12, 12, 16, 85.6),
    "vit_large": (1024, 24, 16, 16, 303.1),
    "vit_huge": (1280, 32, 16, 14, 630.4),
    "vit_giant": (1408, 40, 16, 16, 1011.1),
}


def trainable_millions(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6


@pytest.mark.parametrize("name", FACTORIES)
def test_factory_shapes_and_parameter_counts(name):
    dim, depth, heads, patch, millions = SHAPES[name]
    with torch.device("meta"):
        encoder = getattr(vit, name)(img_size=[224], patch_size=patch)
    assert (encoder.embed_dim, len(encoder.blocks), encoder.num_heads) == (dim, depth, heads)
    assert encoder.pos_embed.shape == (1, (224 // patch) ** 2, dim) and not encoder.pos_embed.requires_grad
    assert abs(trainable_millions(encoder) - millions) < 0.05


def test_vit_huge_predictor_parameter_count_and_tensor_counts():
    with torch.device("meta"):
        encoder = vit.vit_huge(img_size=[224], patch_size=14)
        predictor = vit.vit_predictor(num_patches=256, embed_dim=1280, predictor_embed_dim=384, depth=12, num_heads=16)
    assert abs(trainable_millions(predictor) - 22.3) < 0.05
    assert len(list(encoder.parameters())) == 389 and len(list(predictor.parameters())) == 152


def expected_block_keys(prefix, depth):
    keys = []
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"{prefix}.{i}.{part}.weight", f"{prefix}.{i}.{part}.bias"]
    return keys


def test_state_dict_keys_follow_the_reference_order():
    encoder = vit.vit_tiny(img_size=[32], patch_size=8, depth=2)
    predictor = vit.vit_predictor(num_patches=16, embed_dim=192, predictor_embed_dim=48, depth=2, num_heads=3)
    assert list(encoder.state_dict()) == ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"] + expected_block_keys(
        "blocks", 2
    ) + ["norm.weight", "norm.bias"]
    assert list(predictor.state_dict()) == ["mask_token", "predictor_pos_embed", "predictor_embed.weight", "predictor_embed.bias"] + (
        expected_block_keys("predictor_blocks", 2) + ["predictor_norm.weight", "predictor_norm.bias", "predictor_proj.weight", "predictor_proj.bias"]
    )
    assert predictor.state_dict()["predictor_proj.weight"].shape == (192, 48)
    assert predictor.state_dict()["predictor_blocks.0.attn.qkv.weight"].shape == (144, 48)


def test_init_model_reinitialises_every_linear_without_depth_rescale():
    torch.manual_seed(0)
    raw = vit.vit_tiny(img_size=[32], patch_size=8)
    encoder, predictor = init_model("cpu", patch_size=8, model_name="vit_tiny", crop_size=32, pred_depth=4, pred_emb_dim=96)
    last = raw.blocks[-1].mlp.fc2.weight.std().item()
    assert abs(last - 0.02 / math.sqrt(2 * 12)) < 0.001  # the constructor's rescale ...
    for model in (encoder, predictor):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert abs(module.weight.std().item() - 0.02) < 0.002, name  # ... is gone after init_model
                assert module.weight.abs().max().item() <= 2.0
                assert torch.count_nonzero(module.bias) == 0, name
            elif isinstance(module, torch.nn.LayerNorm):
                assert torch.all(module.weight == 1) and torch.count_nonzero(module.bias) == 0
    assert abs(encoder.patch_embed.proj.weight.std().item() - 0.02) < 0.002
    assert abs(predictor.mask_token.std().item() - 0.02) < 0.01
    assert predictor.predictor_blocks[0].attn.num_heads == encoder.num_heads == 3


def manual_attention(attention: vit.Attention, x: torch.Tensor) -> torch.Tensor:
    """The reference's attention, written out: explicit softmax of q k^T * scale."""
    B, N, C = x.shape
    h = attention.num_heads
    qkv = F.linear(x, attention.qkv.weight.double(), attention.qkv.bias.double())
    q, k, v = qkv.reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    weights = torch.softmax((q @ k.transpose(-2, -1)) * attention.scale, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, attention.proj.weight.double(), attention.proj.bias.double())


@pytest.mark.parametrize("dim,heads,tokens", [(48, 2, 1), (72, 3, 7), (96, 4, 33)])
def test_sdpa_attention_matches_an_fp64_softmax_reference(dim, heads, tokens):
    attention = vit.Attention(dim, num_heads=heads, qkv_bias=True)
    x = torch.randn(3, tokens, dim)
    expected = manual_attention(attention, x.double())
    got = attention(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)  # fp32 against fp64


def test_bf16_autocast_forward_stays_close_to_fp32():
    torch.manual_seed(0)
    encoder, predictor = init_model("cpu", patch_size=8, model_name="vit_tiny", crop_size=32, pred_depth=2, pred_emb_dim=48)
    x = torch.randn(2, 3, 32, 32)
    masks_enc, masks_pred = [torch.tensor([[0, 1, 2, 5, 6], [3, 4, 8, 9, 12]])], [torch.tensor([[10, 11], [14, 15]])]
    reference = predictor(encoder(x, masks_enc), masks_enc, masks_pred)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = predictor(encoder(x, masks_enc), masks_enc, masks_pred)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low.float()).all()
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_sincos_table_matches_the_closed_form():
    dim, grid = 16, 5
    table = vit.get_2d_sincos_pos_embed(dim, grid)
    assert isinstance(table, np.ndarray) and table.shape == (grid * grid, dim) and table.dtype == np.float64
    quarter = dim // 4
    for n in (0, 3, 7, 24):
        row, col = divmod(n, grid)
        expected = []
        for coordinate in (col, row):  # first half: column, second half: row
            angles = [coordinate / 10000 ** (i / quarter) for i in range(quarter)]
            expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
        np.testing.assert_allclose(table[n], expected, rtol=0, atol=1e-12)
    model = vit.vit_tiny(img_size=[grid * 8], patch_size=8, depth=1)
    assert torch.equal(model.pos_embed[0], torch.from_numpy(vit.get_2d_sincos_pos_embed(192, grid)).float())


def test_sincos_helpers_agree_with_each_other_and_add_a_zero_cls_row():
    dim, grid = 12, 3
    one_d = vit.get_1d_sincos_pos_embed(dim, grid)
    assert one_d.shape == (grid, dim)
    np.testing.assert_array_equal(one_d, vit.get_1d_sincos_pos_embed_from_grid(dim, np.arange(grid)))
    np.testing.assert_allclose(one_d[2, :3], [math.sin(2 / 10000 ** (i / 6)) for i in range(3)], rtol=0, atol=1e-15)
    with_cls = vit.get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert with_cls.shape == (grid * grid + 1, dim) and not with_cls[0].any()
    np.testing.assert_array_equal(with_cls[1:], vit.get_2d_sincos_pos_embed(dim, grid))
    cols, rows = np.meshgrid(np.arange(grid), np.arange(grid))  # token n: column n % grid, row n // grid
    np.testing.assert_array_equal(vit.get_2d_sincos_pos_embed_from_grid(dim, np.stack([cols, rows])), with_cls[1:])
    assert vit.get_1d_sincos_pos_embed(dim, grid, cls_token=True).shape == (grid + 1, dim)
    with pytest.raises(ValueError, match="multiple of 4"):
        vit.get_2d_sincos_pos_embed(10, grid)


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean():
    x = torch.ones(4000, 3, 2)
    assert vit.drop_path(x, 0.25, training=False) is x and vit.drop_path(x, 0.0, training=True) is x
    torch.manual_seed(0)
    out = vit.drop_path(x, 0.25, training=True)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all(), "a sample is dropped or scaled as a whole"
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    torch.manual_seed(0)
    keep = (0.75 + torch.rand(4000, 1, 1)).floor()  # one uniform per sample, floor(keep + u)
    assert torch.equal(out, x / 0.75 * keep)
    layer = vit.DropPath()  # drop_prob None: identity, in training too
    assert layer(x) is x and vit.DropPath(0.25).eval()(x) is x


def test_conv_embed_stem_layers_and_tokens():
    stem = vit.ConvEmbed([8, 16, 24], [2, 2, 1], img_size=[32])
    assert [type(m).__name__ for m in stem.stem] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    assert stem.stem[0].bias is None and stem.stem[6].kernel_size == (1, 1) and stem.num_patches == 64
    assert stem(torch.randn(2, 3, 32, 32)).shape == (2, 64, 24)
    plain = vit.ConvEmbed([8, 24], [4, 2], img_size=32, batch_norm=False)
    assert [type(m).__name__ for m in plain.stem] == ["Conv2d", "ReLU", "Conv2d"] and plain.stem[0].bias is not None
    assert plain(torch.randn(1, 3, 32, 32)).shape == (1, plain.num_patches, 24) and plain.num_patches == 16
    with pytest.raises(ValueError, match="one stride per"):
        vit.ConvEmbed([8, 16], [2])


def test_encoder_and_predictor_shapes_with_several_masks():
    encoder = vit.vit_tiny(img_size=[32], patch_size=8, depth=2)
    predictor = vit.vit_predictor(num_patches=16, embed_dim=192, predictor_embed_dim=48, depth=2, num_heads=3)
    x = torch.randn(3, 3, 32, 32)
    assert encoder(x).shape == (3, 16, 192)
    masks_enc = [torch.randperm(16)[:6].sort().values.repeat(3, 1) for _ in range(2)]
    masks_pred = [torch.randperm(16)[:4].sort().values.repeat(3, 1) for _ in range(3)]
    context = encoder(x, masks_enc)
    assert context.shape == (2 * 3, 6, 192)
    out = predictor(context, masks_enc, masks_pred)
    assert out.shape == (3 * 2 * 3, 4, 192)
    # Row (p * nenc + e) * B + b is target block p of sample b seen from context e.
    for p in range(3):
        for e in range(2):
            single = predictor(encoder(x, [masks_enc[e]]), [masks_enc[e]], [masks_pred[p]])
            torch.testing.assert_close(out[(p * 2 + e) * 3 : (p * 2 + e + 1) * 3], single, rtol=1e-5, atol=1e-5)


def test_single_token_masks():
    encoder = vit.vit_tiny(img_size=[16], patch_size=8, depth=1)
    predictor = vit.vit_predictor(num_patches=4, embed_dim=192, predictor_embed_dim=48, depth=1, num_heads=3)
    masks_enc, masks_pred = [torch.tensor([[2]])], [torch.tensor([[0]])]
    out = predictor(encoder(torch.randn(1, 3, 16, 16), masks_enc), masks_enc, masks_pred)
    assert out.shape == (1, 1, 192) and torch.isfinite(out).all()


def test_pos_encoding_is_interpolated_at_another_resolution():
    encoder = vit.vit_tiny(img_size=[32], patch_size=8, depth=1)
    assert encoder.interpolate_pos_encoding(torch.zeros(1, 16, 192), encoder.pos_embed) is encoder.pos_embed
    assert encoder(torch.randn(1, 3, 64, 64)).shape == (1, 64, 192)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: vit.vit_tiny(img_size=[30], patch_size=8), "not divisible by patch_size"),
        (lambda: vit.VisionTransformer(img_size=[32], patch_size=8, embed_dim=100, num_heads=3), "not divisible by num_heads"),
        (lambda: vit.vit_predictor(num_patches=15, embed_dim=192), "square"),
        (lambda: vit.vit_tiny(img_size=[32], patch_size=0), "patch_size"),
        (lambda: init_model("cpu", model_name="vit_enormous"), "vit_enormous"),
    ],
)
def test_bad_model_parameters_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_encoder_and_predictor_compile_without_graph_breaks():
    """fullgraph=True fails on any graph break, including at the fastjepa ops."""
    from fastjepa.models.vision_transformer import vit_predictor, vit_tiny

    torch.manual_seed(0)
    encoder = vit_tiny(img_size=[32], patch_size=8, depth=2)
    predictor = vit_predictor(num_patches=16, embed_dim=192, predictor_embed_dim=48, depth=1, num_heads=3)
    imgs = torch.randn(2, 3, 32, 32)
    masks_enc = [torch.tensor([[0, 1, 2, 5], [3, 4, 8, 9]])]
    masks_pred = [torch.tensor([[6, 7], [10, 11]]), torch.tensor([[12, 13], [14, 15]])]

    def loss(encoder, predictor):
        return predictor(encoder(imgs, masks_enc), masks_enc, masks_pred).square().mean()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = compiled(encoder, predictor)
    got.backward()
    compiled_grads = [p.grad.clone() for p in encoder.parameters() if p.grad is not None]
    encoder.zero_grad()
    predictor.zero_grad()
    want = loss(encoder, predictor)
    want.backward()
    torch.testing.assert_close(got, want)
    eager_grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert len(compiled_grads) == len(eager_grads) > 0
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)
