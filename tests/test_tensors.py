"""trunc_normal_ and repeat_interleave_batch."""

import math

import pytest
import torch

from fastjepa.utils.tensors import repeat_interleave_batch, trunc_normal_


def test_trunc_normal_statistics_and_bounds():
    x = trunc_normal_(torch.empty(200_000), mean=0.5, std=0.02, a=0.47, b=0.55)
    assert x.min() >= 0.47 and x.max() <= 0.55
    # A normal truncated at -1.5 and +2.5 sigma: the standard deviation of that truncated law.
    alpha, beta = -1.5, 2.5
    def pdf(t):
        return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    def cdf(t):
        return (1 + math.erf(t / math.sqrt(2))) / 2
    z = cdf(beta) - cdf(alpha)
    mean_shift = (pdf(alpha) - pdf(beta)) / z
    variance = 1 + (alpha * pdf(alpha) - beta * pdf(beta)) / z - mean_shift**2
    assert abs(x.std().item() - 0.02 * math.sqrt(variance)) < 2e-4
    assert abs(x.mean().item() - (0.5 + 0.02 * mean_shift)) < 2e-4


def test_trunc_normal_follows_the_global_rng():
    torch.manual_seed(3)
    a = trunc_normal_(torch.empty(10), std=0.02)
    torch.manual_seed(3)
    b = trunc_normal_(torch.empty(10), std=0.02)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def loop_reference(x, B, repeat):
    chunks = [x[i * B : (i + 1) * B] for i in range(len(x) // B)]
    return torch.cat([chunk for chunk in chunks for _ in range(repeat)])


@pytest.mark.parametrize("N,B,repeat", [(3, 2, 2), (1, 1, 1), (2, 5, 3), (4, 1, 4)])
def test_repeat_interleave_batch_matches_the_loop(N, B, repeat):
    x = torch.randn(N * B, 3, 2)
    torch.testing.assert_close(repeat_interleave_batch(x, B, repeat), loop_reference(x, B, repeat), rtol=0, atol=0)


def test_repeat_interleave_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of B"):
        repeat_interleave_batch(torch.randn(5, 2), 2, 2)
    with pytest.raises(ValueError, match="repeat"):
        repeat_interleave_batch(torch.randn(4, 2), 2, 0)
