"""Multi-block masks: invariants over thousands of draws, the reference's quirks,
determinism, the retry-and-relax rule, the collator, bad parameters."""

import logging
import math

import pytest
import torch

from fastjepa.masks.multiblock import MaskCollator, MultiBlockMaskSampler

# The published ViT-H/14 configuration (16 x 16 patches).
REFERENCE_CONFIG = dict(
    input_size=224,
    patch_size=14,
    enc_mask_scale=(0.85, 1.0),
    pred_mask_scale=(0.15, 0.2),
    aspect_ratio=(0.75, 1.5),
    nenc=1,
    npred=4,
    min_keep=10,
    allow_overlap=False,
)
GRID = 16


def draw(sampler, batches, batch_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [sampler.sample(batch_size, generator=g) for _ in range(batches)]


def rectangle_size(indices, width):
    """(h, w) of an index set that must be a full rectangle of the grid."""
    rows, cols = (indices // width).unique(), (indices % width).unique()
    h, w = len(rows), len(cols)
    assert h * w == len(indices), "target mask is not a full rectangle"
    assert rows.max() - rows.min() + 1 == h and cols.max() - cols.min() + 1 == w
    return h, w


def check_index_lists(masks, batch_size, num_patches):
    assert len({m.shape for m in masks}) == 1
    for m in masks:
        assert m.dtype == torch.int64 and m.shape[0] == batch_size and m.shape[1] >= 1
        assert m.min() >= 0 and m.max() < num_patches
        assert torch.all(m[:, 1:] > m[:, :-1]), "indices must be strictly increasing within a row"


def test_reference_config_invariants_over_thousands_of_samples():
    sampler = MultiBlockMaskSampler(**REFERENCE_CONFIG)
    sizes, used = set(), torch.zeros(GRID * GRID, dtype=torch.long)
    for masks_enc, masks_pred in draw(sampler, batches=60, batch_size=64):  # 3,840 samples
        assert len(masks_enc) == 1 and len(masks_pred) == 4
        check_index_lists(masks_enc, 64, GRID * GRID)
        check_index_lists(masks_pred, 64, GRID * GRID)
        batch_sizes = {rectangle_size(m[b], GRID) for m in masks_pred for b in range(64)}
        assert len(batch_sizes) == 1, "one target block size per batch"
        sizes |= batch_sizes
        context = masks_enc[0]
        assert context.shape[1] > REFERENCE_CONFIG["min_keep"]
        for b in range(64):
            targets = torch.cat([m[b] for m in masks_pred])
            assert not torch.isin(context[b], targets).any(), "context overlaps a target"
            # The context block is the top-left 15 x 15 square here (size 15, top = left = 0);
            # truncation to the batch minimum keeps the lowest indices of rectangle minus targets.
            square = torch.arange(GRID * GRID).view(GRID, GRID)[:15, :15].flatten()
            untruncated = square[~torch.isin(square, targets)]
            assert torch.equal(context[b], untruncated[: context.shape[1]])
        for m in masks_enc + masks_pred:
            used += torch.bincount(m.flatten(), minlength=GRID * GRID)
    # Target sizes the reference produces at 224/14 (area 35 to 54 patches); (6, 6) takes 1.6%
    # of the r interval and (5, 7) 4.7%, so 60 batches need not show all six.
    reference_sizes = {(5, 7), (6, 6), (6, 7), (7, 6), (8, 6), (9, 6)}
    assert sampler.possible_block_sizes(REFERENCE_CONFIG["pred_mask_scale"], REFERENCE_CONFIG["aspect_ratio"]) == reference_sizes
    assert sizes <= reference_sizes and len(sizes) >= 4
    grid_use = used.view(GRID, GRID)
    assert grid_use[-1].sum() == 0 and grid_use[:, -1].sum() == 0, "last row and column are never masked"
    assert (grid_use[:-1, :-1] > 0).all()


def test_fix_position_range_reaches_the_last_row_and_column():
    sampler = MultiBlockMaskSampler(**REFERENCE_CONFIG, fix_position_range=True)
    used = torch.zeros(GRID * GRID, dtype=torch.long)
    for _, masks_pred in draw(sampler, batches=20, batch_size=64):
        for m in masks_pred:
            used += torch.bincount(m.flatten(), minlength=GRID * GRID)
    grid_use = used.view(GRID, GRID)
    assert grid_use[-1].sum() > 0 and grid_use[:, -1].sum() > 0


@pytest.mark.parametrize("scale,aspect", [((0.15, 0.2), (0.75, 1.5)), ((0.2, 0.8), (0.3, 3.0)), ((0.05, 0.1), (1.0, 1.0))])
def test_block_sizes_follow_one_draw_for_scale_and_aspect(scale, aspect):
    sampler = MultiBlockMaskSampler(input_size=224, patch_size=16, pred_mask_scale=scale, aspect_ratio=aspect, min_keep=0)
    grid = 14
    for r in torch.rand(500, dtype=torch.float64).tolist():
        h, w = sampler.block_size(r, scale, aspect)
        max_keep = int(grid * grid * (scale[0] + r * (scale[1] - scale[0])))
        ratio = aspect[0] + r * (aspect[1] - aspect[0])
        assert h == min(round((max_keep * ratio) ** 0.5), grid - 1)
        assert w == min(round((max_keep / ratio) ** 0.5), grid - 1)
    observed = set()
    for _, masks_pred in draw(sampler, batches=200, batch_size=2):
        observed.add(rectangle_size(masks_pred[0][0], grid))
    assert observed <= sampler.possible_block_sizes(scale, aspect)


def test_reference_config_with_several_context_blocks():
    sampler = MultiBlockMaskSampler(**{**REFERENCE_CONFIG, "nenc": 2})
    for masks_enc, masks_pred in draw(sampler, batches=10, batch_size=32):
        assert len(masks_enc) == 2
        check_index_lists(masks_enc, 32, GRID * GRID)
        for b in range(32):
            targets = torch.cat([m[b] for m in masks_pred])
            assert not any(torch.isin(context[b], targets).any() for context in masks_enc)


def test_rejected_contexts_drop_the_last_target_constraint_first():
    # The constructor defaults on an 8 x 8 grid reject many contexts: after 20 failed
    # draws only target 0 still constrains, after 40 none does.
    sampler = MultiBlockMaskSampler(input_size=128, patch_size=16, nenc=2, npred=2, min_keep=4)
    overlaps = torch.zeros(2, dtype=torch.long)
    for masks_enc, masks_pred in draw(sampler, batches=100, batch_size=32):
        check_index_lists(masks_enc, 32, 64)
        assert masks_enc[0].shape[1] > 4
        for b in range(32):
            for context in masks_enc:
                overlaps += torch.tensor([torch.isin(context[b], m[b]).any() for m in masks_pred])
    assert overlaps[1] > 100 and overlaps[0] < overlaps[1] / 5, overlaps


def test_allow_overlap_lets_the_context_cover_targets():
    sampler = MultiBlockMaskSampler(**{**REFERENCE_CONFIG, "allow_overlap": True})
    (masks_enc, masks_pred), = draw(sampler, batches=1, batch_size=16)
    overlap = sum(torch.isin(masks_enc[0][b], masks_pred[0][b]).sum().item() for b in range(16))
    assert overlap > 0


def test_relaxation_drops_target_constraints_after_repeated_failures(caplog):
    # On an 8 x 8 grid the context is always the 7 x 7 square at (0, 0) (49 patches) and the
    # one target covers at least 20 of its patches, so every constrained draw keeps
    # <= 30 = min_keep patches: after 20 failures the target stops constraining.
    sampler = MultiBlockMaskSampler(
        input_size=64, patch_size=8, enc_mask_scale=(1.0, 1.0), pred_mask_scale=(0.5, 0.5), aspect_ratio=(1.0, 1.0), npred=1, min_keep=30
    )
    with caplog.at_level(logging.WARNING, logger="fastjepa.masks.multiblock"):
        (masks_enc, masks_pred), = draw(sampler, batches=1, batch_size=4)
    assert "ignoring one more target block" in caplog.text
    assert masks_enc[0].shape == (4, 49)
    assert all(torch.isin(masks_pred[0][b], masks_enc[0][b]).all() for b in range(4))


def test_same_seed_same_masks_and_different_seeds_differ():
    sampler = MultiBlockMaskSampler(**REFERENCE_CONFIG)
    first, again, other = draw(sampler, 3, 8, seed=5), draw(sampler, 3, 8, seed=5), draw(sampler, 3, 8, seed=6)
    def flat(batches):
        return torch.cat([m.flatten() for enc, pred in batches for m in enc + pred])
    assert torch.equal(flat(first), flat(again))
    a, b = flat(first), flat(other)
    assert a.shape != b.shape or not torch.equal(a, b)


def test_batch_of_one():
    sampler = MultiBlockMaskSampler(**REFERENCE_CONFIG)
    masks_enc, masks_pred = sampler.sample(1, generator=torch.Generator().manual_seed(0))
    assert masks_enc[0].shape[0] == 1 and all(m.shape == (1, m.shape[1]) for m in masks_pred)


def oracle_masks(config: dict, batch_size: int, step: int):
    """The reference collator's masks for batch ``step``, drawn one value at a time as
    ../shared/REFERENCE.md section 3.2 describes: block sizes from two float32 draws of a
    generator seeded with ``step``, then, sample by sample, each target's (top, left) and each
    context's (top, left) redrawn until it keeps more than min_keep patches, from the global
    RNG; after every 20 failed draws one more target (the last first) stops constraining."""
    size = config["input_size"]
    height, width = (size, size) if isinstance(size, int) else size
    height, width = height // config["patch_size"], width // config["patch_size"]
    g = torch.Generator().manual_seed(step)

    def block(scale, aspect):
        r = torch.rand(1, generator=g).item()
        keep = int(height * width * (scale[0] + r * (scale[1] - scale[0])))
        ratio = aspect[0] + r * (aspect[1] - aspect[0])
        return min(round(math.sqrt(keep * ratio)), height - 1), min(round(math.sqrt(keep / ratio)), width - 1)

    (h, w), (eh, ew) = block(config["pred_mask_scale"], config["aspect_ratio"]), block(config["enc_mask_scale"], (1.0, 1.0))

    def rectangle(bh, bw):
        top, left = torch.randint(0, height - bh, (1,)).item(), torch.randint(0, width - bw, (1,)).item()
        grid = torch.zeros(height, width, dtype=torch.bool)
        grid[top : top + bh, left : left + bw] = True
        return grid

    targets, contexts = [], []
    for _ in range(batch_size):
        blocks = [rectangle(h, w) for _ in range(config["npred"])]
        targets.append([b.flatten().nonzero().flatten() for b in blocks])
        constraints = [] if config["allow_overlap"] else blocks
        sample_contexts = []
        for _ in range(config["nenc"]):
            failures = 0
            while True:
                grid = rectangle(eh, ew)
                for covered in constraints[: max(len(constraints) - failures // 20, 0)]:
                    grid &= ~covered
                if grid.sum() > config["min_keep"]:
                    break
                failures += 1
            sample_contexts.append(grid.flatten().nonzero().flatten())
        contexts.append(sample_contexts)
    k_pred = min(len(m) for masks in targets for m in masks)
    k_enc = min(len(m) for masks in contexts for m in masks)
    masks_pred = [torch.stack([targets[b][i][:k_pred] for b in range(batch_size)]) for i in range(config["npred"])]
    masks_enc = [torch.stack([contexts[b][i][:k_enc] for b in range(batch_size)]) for i in range(config["nenc"])]
    return masks_enc, masks_pred


ORACLE_CONFIGS = [
    REFERENCE_CONFIG,
    {**REFERENCE_CONFIG, "input_size": (96, 160), "patch_size": 16, "nenc": 3, "npred": 3, "min_keep": 2},
    # the constructor's defaults on an 8 x 8 grid: many contexts are redrawn, some relaxed
    dict(input_size=128, patch_size=16, enc_mask_scale=(0.2, 0.8), pred_mask_scale=(0.2, 0.8), aspect_ratio=(0.3, 3.0), nenc=2, npred=2,
         min_keep=4, allow_overlap=False),
    # every context is relaxed after 20 failed draws
    dict(input_size=64, patch_size=8, enc_mask_scale=(1.0, 1.0), pred_mask_scale=(0.5, 0.5), aspect_ratio=(1.0, 1.0), nenc=1, npred=1,
         min_keep=30, allow_overlap=False),
    {**REFERENCE_CONFIG, "allow_overlap": True},
]


@pytest.mark.parametrize("config", ORACLE_CONFIGS, ids=["vith14", "odd-grid", "redraws", "relaxed", "overlap"])
@pytest.mark.parametrize("batch_size", [1, 5, 33])
def test_collator_draws_the_reference_random_numbers(config, batch_size):
    """Same masks as the one-value-at-a-time oracle, batch after batch, and the global RNG left
    in the same state, so whatever draws next (the next image's crop) draws the same too."""
    collator = MaskCollator(**config)
    batch = [(torch.zeros(1), 0)] * batch_size
    torch.manual_seed(1000 + batch_size)
    ours = [collator(batch)[1:] for _ in range(4)]
    state_after_ours = torch.get_rng_state()
    torch.manual_seed(1000 + batch_size)
    expected = [oracle_masks(config, batch_size, step) for step in range(4)]
    assert torch.equal(state_after_ours, torch.get_rng_state())
    for (enc, pred), (expected_enc, expected_pred) in zip(ours, expected):
        assert len(enc) == config["nenc"] and len(pred) == config["npred"]
        for got, want in zip(enc + pred, expected_enc + expected_pred):
            assert got.dtype == torch.int64 and got.shape == want.shape and torch.equal(got, want)


def test_sampler_with_one_generator_draws_the_collator_numbers():
    """``sample(generator=g)`` (the trainer's call) draws sizes and positions from g alone: the
    collator's numbers with g in place of the global RNG."""
    sampler = MultiBlockMaskSampler(**REFERENCE_CONFIG)
    g = torch.Generator().manual_seed(7)
    sizes_then_positions = sampler.sample(9, generator=g)
    g = torch.Generator().manual_seed(7)
    split = sampler.sample(9, generator=g, position_generator=g)
    assert all(torch.equal(a, b) for a, b in zip(sizes_then_positions[0] + sizes_then_positions[1], split[0] + split[1]))


def test_collator_returns_batch_and_the_seeded_masks():
    collator = MaskCollator(**REFERENCE_CONFIG)
    batch = [(torch.full((3, 4, 4), float(i)), i) for i in range(5)]
    torch.manual_seed(0)
    (images, labels), masks_enc, masks_pred = collator(batch)
    assert images.shape == (5, 3, 4, 4) and labels.tolist() == [0, 1, 2, 3, 4]
    torch.manual_seed(0)
    expected_enc, expected_pred = collator.sampler.sample(5, generator=torch.Generator().manual_seed(0), position_generator=torch.default_generator)
    assert all(torch.equal(a, b) for a, b in zip(masks_enc + masks_pred, expected_enc + expected_pred))
    torch.manual_seed(0)
    _, masks_enc_1, _ = collator(batch)  # the second batch is seeded with 1
    torch.manual_seed(0)
    expected_1, _ = collator.sampler.sample(5, generator=torch.Generator().manual_seed(1), position_generator=torch.default_generator)
    assert torch.equal(masks_enc_1[0], expected_1[0])


def test_collator_in_a_dataloader_with_workers():
    collator = MaskCollator(**REFERENCE_CONFIG)
    data = [(torch.zeros(3, 8, 8), 0)] * 32
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=collator, num_workers=2, drop_last=True)
    seen = list(loader)
    assert len(seen) == 4 and collator.step() == 4  # the counter is shared with the workers
    assert all(batch[1][0].shape[0] == 8 for batch in seen)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"pred_mask_scale": (0.0, 0.2)}, "pred_mask_scale"),
        ({"enc_mask_scale": (0.85, 1.2)}, "enc_mask_scale"),
        ({"pred_mask_scale": (0.3, 0.2)}, "min <= max"),
        ({"aspect_ratio": (0.0, 1.5)}, "aspect_ratio"),
        ({"min_keep": 256}, "min_keep"),
        ({"min_keep": -1}, "min_keep"),
        ({"input_size": 225}, "divisible by patch_size"),
        ({"npred": 0}, "npred"),
        ({"nenc": 0}, "nenc"),
        ({"patch_size": 0}, "patch_size"),
        ({"min_keep": 40}, "more than min_keep=40"),  # targets hold 35 to 54 patches
    ],
)
def test_impossible_parameters_raise_value_error(override, message):
    with pytest.raises(ValueError, match=message):
        MultiBlockMaskSampler(**{**REFERENCE_CONFIG, **override})


def test_bad_sample_arguments():
    sampler = MultiBlockMaskSampler(**REFERENCE_CONFIG)
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; the CPU path is the same code up to the final copy")
def test_cuda_masks_equal_cpu_masks_and_sampling_never_syncs():
    sampler = MultiBlockMaskSampler(**REFERENCE_CONFIG)
    cpu_enc, cpu_pred = sampler.sample(128, generator=torch.Generator().manual_seed(3))
    sampler.sample(128, generator=torch.Generator().manual_seed(3), device="cuda")  # warm the pinned-memory cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu_enc, gpu_pred = sampler.sample(128, generator=torch.Generator().manual_seed(3), device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(m.is_cuda for m in gpu_enc + gpu_pred)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu_enc + cpu_pred, gpu_enc + gpu_pred))
