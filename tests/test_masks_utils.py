"""apply_masks against a per-sample loop reference, forward and backward."""

import pytest
import torch

from fastjepa.masks.utils import apply_masks


def loop_reference(x, masks):
    """Row i * B + b: x[b, masks[i][b]], written one sample at a time."""
    return torch.stack([x[b, m[b]] for m in masks for b in range(x.shape[0])])


def random_masks(count, B, N, K, dtype=torch.int64):
    return [torch.stack([torch.randperm(N)[:K].sort().values for _ in range(B)]).to(dtype) for _ in range(count)]


@pytest.mark.parametrize("B,N,D,K,count", [(3, 16, 5, 4, 2), (1, 1, 3, 1, 1), (2, 9, 1, 9, 3), (5, 37, 7, 11, 4)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_apply_masks_matches_the_loop_reference_forward_and_backward(B, N, D, K, count, dtype):
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    masks = random_masks(count, B, N, K, dtype)
    out = apply_masks(x, masks)
    expected = loop_reference(x, [m.long() for m in masks])
    assert out.shape == (count * B, K, D)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # masks overlap: gradients accumulate


def test_apply_masks_accepts_a_single_tensor():
    x = torch.randn(2, 6, 3)
    (mask,) = random_masks(1, 2, 6, 3)
    torch.testing.assert_close(apply_masks(x, mask), apply_masks(x, [mask]))


@pytest.mark.parametrize(
    "x, masks, message",
    [
        (torch.randn(2, 6), [torch.zeros(2, 3, dtype=torch.long)], r"\(B, N, D\)"),
        (torch.randn(2, 6, 3), [torch.zeros(3, 3, dtype=torch.long)], "B=2"),
        (torch.randn(2, 6, 3), [torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)], "one K"),
        (torch.randn(2, 6, 3), [torch.zeros(2, 3)], "int32 or int64"),
    ],
)
def test_apply_masks_rejects_bad_input(x, masks, message):
    with pytest.raises(ValueError, match=message):
        apply_masks(x, masks)
