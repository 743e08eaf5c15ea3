"""fastjepa/masks/random.py and default.py, the twins of the reference's src/masks/random.py
and default.py: the random collator's masks and global RNG stream against a per-sample oracle,
and its argument checks."""

import pytest
import torch

from fastjepa.masks.default import DefaultCollator
from fastjepa.masks.random import MaskCollator


def oracle(step: int, batch_size: int, num_patches: int, ratio: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's draws, written out: one ratio from a generator seeded with the step, then
    one permutation per sample from the global RNG; context first, target after."""
    u = torch.rand(1, generator=torch.Generator().manual_seed(step)).item()
    keep = int(num_patches * (1.0 - (ratio[0] + u * (ratio[1] - ratio[0]))))
    perms = [torch.randperm(num_patches) for _ in range(batch_size)]
    return torch.stack([p[:keep] for p in perms]), torch.stack([p[keep:] for p in perms])


@pytest.mark.parametrize("ratio, input_size, patch_size", [((0.4, 0.6), (224, 224), 16), ((0.1, 0.9), (48, 80), 8), ((0.25, 0.25), 36, 6)],
                         ids=["default", "non-square", "int-size-fixed-ratio"])
def test_masks_and_global_rng_equal_the_oracle(ratio, input_size, patch_size):
    collator = MaskCollator(ratio=ratio, input_size=input_size, patch_size=patch_size)
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    num_patches = (size[0] // patch_size) * (size[1] // patch_size)
    assert collator.num_patches == num_patches and (collator.height, collator.width) == (size[0] // patch_size, size[1] // patch_size)
    lengths = set()
    for step, batch_size in enumerate([1, 3, 7, 2, 5]):
        batch = [(torch.full((3, 2), float(i)), i) for i in range(batch_size)]
        torch.manual_seed(100 + step)
        images, masks_enc, masks_pred = collator(batch)
        state = torch.get_rng_state()
        torch.manual_seed(100 + step)
        expected_enc, expected_pred = oracle(step, batch_size, num_patches, ratio)
        assert torch.equal(state, torch.get_rng_state())  # the global RNG ends where the reference's does
        assert isinstance(masks_enc, list) and isinstance(masks_pred, list) and len(masks_enc) == len(masks_pred) == 1
        assert masks_enc[0].dtype == masks_pred[0].dtype == torch.int64
        assert torch.equal(masks_enc[0], expected_enc) and torch.equal(masks_pred[0], expected_pred)
        assert masks_enc[0].shape[0] == batch_size and masks_enc[0].shape[1] + masks_pred[0].shape[1] == num_patches
        full = torch.cat([masks_enc[0], masks_pred[0]], dim=1).sort(dim=1).values
        assert torch.equal(full, torch.arange(num_patches).expand(batch_size, -1))  # a partition of the patches
        assert torch.equal(images[0], torch.stack([x for x, _ in batch])) and images[1].tolist() == list(range(batch_size))
        lengths.add(masks_enc[0].shape[1])
    assert collator.step() == 5
    if ratio[0] == ratio[1]:
        assert lengths == {int(num_patches * (1 - ratio[0]))}
    else:
        assert len(lengths) > 1  # the ratio changes from batch to batch


def test_the_step_counter_is_shared_and_seeds_each_batch():
    collator = MaskCollator(ratio=(0.1, 0.9), input_size=64, patch_size=8)
    assert [collator.step() for _ in range(3)] == [0, 1, 2]
    torch.manual_seed(0)
    _, enc, _ = collator([torch.zeros(1)] * 2)  # step 3
    torch.manual_seed(0)
    expected, _ = oracle(3, 2, 64, (0.1, 0.9))
    assert torch.equal(enc[0], expected)
    torch.manual_seed(0)
    wrong, _ = oracle(0, 2, 64, (0.1, 0.9))
    assert wrong.shape != expected.shape  # the oracle can tell the steps apart


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=(0.4,)), "ratio"),
    (dict(ratio=(0.6, 0.4)), "ratio"),
    (dict(ratio=(0.4, 1.0)), "ratio"),
    (dict(ratio=(-0.1, 0.5)), "ratio"),
    (dict(ratio=(0.0, 0.5)), "num_keep"),  # a draw of exactly 0 keeps every patch: no target
    (dict(ratio=(0.4, 0.99), input_size=32, patch_size=16), "num_keep"),  # 4 patches: the context can be empty
    (dict(input_size=(224, 220)), "input_size"),
    (dict(input_size=(224, 224, 3)), "input_size"),
    (dict(patch_size=0), "patch_size"),
    (dict(patch_size=16.0), "patch_size"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskCollator(**kwargs)


def test_default_collator_returns_no_masks():
    batch = [(torch.full((2, 2), float(i)), i) for i in range(3)]
    images, masks_enc, masks_pred = DefaultCollator()(batch)
    assert masks_enc is None and masks_pred is None
    assert torch.equal(images[0], torch.stack([torch.full((2, 2), float(i)) for i in range(3)])) and torch.equal(images[1], torch.arange(3))
