"""fastjepa.eval.attentive: K probes batched equal K probes alone (forward and training), a task
only attention solves is learned, the choice is made on held-out train and refit on all of it,
runs repeat exactly, and bad arguments are named."""

import io
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastjepa.eval import attentive
from fastjepa.eval.attentive import AttentiveProbes, attentive_probe, fit_probes, probe_grid

DIM, HEADS, CLASSES = 32, 4, 5


class OneProbe(nn.Module):
    """The oracle: one probe written with nn layers and an explicit softmax attention, V-JEPA's
    AttentiveClassifier (depth 1)."""

    def __init__(self, dim: int, heads: int, classes: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1, self.q, self.kv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        batch, length, dim = tokens.shape
        head_dim = dim // self.heads
        query = self.q(self.query).reshape(1, 1, self.heads, head_dim).transpose(1, 2)
        keys, values = self.kv(self.norm1(tokens)).reshape(batch, length, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        weights = (query @ keys.transpose(-2, -1) / math.sqrt(head_dim)).softmax(dim=-1)
        pooled = self.query + self.proj((weights @ values).transpose(1, 2).reshape(batch, 1, dim))
        pooled = pooled + self.fc2(F.gelu(self.fc1(self.norm2(pooled))))
        return self.head(pooled)[:, 0]

    @classmethod
    def from_probes(cls, probes: AttentiveProbes, index: int) -> "OneProbe":
        probe = cls(probes.query.shape[-1], probes.num_heads, probes.head_weight.shape[1])
        with torch.no_grad():
            for name, parameter in probe.named_parameters():
                parameter.copy_(getattr(probes, name.replace(".", "_"))[index].reshape(parameter.shape))
        return probe


def test_probe_grid():
    assert probe_grid(1) == [(1e-3, 1e-3)]
    for k in range(1, 31):
        grid = probe_grid(k)
        assert len(grid) == k == len(set(grid)) and grid[0] == (1e-3, 1e-3)
    grid = probe_grid(20)
    lrs, decays = sorted({lr for lr, _ in grid}), sorted({wd for _, wd in grid})
    assert lrs == [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2] and decays == [1e-4, 1e-3, 1e-2, 1e-1]  # 5 x 4: the whole product
    assert sorted(probe_grid(9)) == sorted((lr, wd) for lr in (3.16e-4, 1e-3, 3.16e-3) for wd in (1e-4, 1e-3, 1e-2))
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="number of probes"):
            probe_grid(bad)


def test_batched_forward_equals_each_probe_alone():
    probes = AttentiveProbes(3, DIM, HEADS, CLASSES, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # move every parameter off its initial value, so each one matters
        for parameter in probes.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel())))
    tokens = torch.randn(6, 7, DIM, generator=torch.Generator().manual_seed(1))
    logits = probes(tokens)
    assert logits.shape == (3, 6, CLASSES)
    for i in range(3):
        torch.testing.assert_close(logits[i], OneProbe.from_probes(probes, i)(tokens), rtol=1e-5, atol=1e-5)  # fp32


def test_batched_training_equals_each_probe_trained_alone():
    """fit_probes against torch.optim.AdamW on the oracle, one probe at a time, on the same batches
    (16, 16, 8 images per epoch) with the schedule written out: warmup 3 steps, cosine to step 9."""
    grid = [(1e-3, 1e-3), (3e-3, 0.05), (3e-4, 0.0)]
    generator = torch.Generator().manual_seed(2)
    tokens, labels = torch.randn(50, 5, DIM, generator=generator), torch.randint(0, CLASSES, (50,), generator=generator)
    rows = torch.arange(10, 50)
    probes = AttentiveProbes(len(grid), DIM, HEADS, CLASSES, generator=torch.Generator().manual_seed(3))
    alone = [OneProbe.from_probes(probes, i) for i in range(len(grid))]
    initial_queries = probes.query.detach().clone()
    fit_probes(probes, tokens, labels, rows, grid, epochs=3, batch_size=16, warmup_epochs=1, seed=7)

    for i, (probe, (lr, weight_decay)) in enumerate(zip(alone, grid)):
        decayed = [p for p in probe.parameters() if p.dim() > 1]
        others = [p for p in probe.parameters() if p.dim() == 1]
        optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}], lr=lr)
        order_generator, step = torch.Generator().manual_seed(7), 0
        for _ in range(3):
            order = rows[torch.randperm(len(rows), generator=order_generator)]
            for batch in order.split(16):
                step += 1
                factor = step / 3 if step < 3 else 0.5 * (1 + math.cos(math.pi * (step - 3) / 6))
                for group in optimizer.param_groups:
                    group["lr"] = lr * factor
                optimizer.zero_grad()
                F.cross_entropy(probe(tokens[batch]), labels[batch]).backward()
                optimizer.step()
        assert step == 9
        trained = OneProbe.from_probes(probes, i)
        for (name, expected), actual in zip(probe.named_parameters(), trained.parameters()):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-6, msg=f"probe {i} {name}")
        assert (probe.query.flatten() - initial_queries[i].flatten()).abs().max() > lr  # it moved: the comparison is not vacuous


def marker_task(n: int, length: int = 8, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens = a fixed position code + noise, and a marker vector added at one position: the
    label is that position. The mean of the tokens is the same whatever the label, so no probe
    of mean-pooled features beats chance (1 / length); attending to the marker solves it."""
    generator = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(1234)
    positions, marker = torch.randn(length, dim, generator=fixed), 2 * torch.randn(dim, generator=fixed)
    labels = torch.randint(0, length, (n,), generator=generator)
    tokens = positions + 0.5 * torch.randn(n, length, dim, generator=generator)
    tokens[torch.arange(n), labels] += marker
    return tokens, labels


def test_attention_task_is_learned_and_chosen_on_heldout():
    train_tokens, train_labels = marker_task(600, seed=0)
    val_tokens, val_labels = marker_task(300, seed=1)

    # Mean pooling sees no signal: a least-squares linear read-out of the means stays at chance.
    def with_bias(tokens):
        return F.pad(tokens.mean(dim=1), (0, 1), value=1.0)

    weights = torch.linalg.lstsq(with_bias(train_tokens), F.one_hot(train_labels, 8).float()).solution
    assert ((with_bias(val_tokens) @ weights).argmax(dim=1) == val_labels).float().mean() < 0.25

    grid = [(1e-7, 0.0), (1e-3, 1e-3)]  # a probe that cannot move from its initialisation, and V-JEPA's
    result = attentive_probe(train_tokens, train_labels, val_tokens, val_labels, num_classes=8, num_heads=HEADS, grid=grid)
    frozen, learned = result.heads
    assert learned["heldout_top1"] > 0.9 and learned["val_top1"] > 0.9 and frozen["val_top1"] < 0.3
    assert result.chosen["lr"] == 1e-3 and result.top1 == result.chosen["val_top1"] > 0.9

    # Val labels shifted by one: val now favours the frozen probe, the choice must not follow it.
    shifted = attentive_probe(train_tokens, train_labels, val_tokens, (val_labels + 1) % 8, num_classes=8, num_heads=HEADS, grid=grid, epochs=5)
    frozen, learned = shifted.heads
    assert frozen["val_top1"] > learned["val_top1"] and learned["heldout_top1"] > frozen["heldout_top1"]
    assert shifted.chosen["lr"] == 1e-3 and shifted.top1 < 0.1


def test_the_choice_is_refit_on_all_of_train(monkeypatch):
    tokens, labels = marker_task(60, dim=DIM, seed=3)
    calls = []

    def spy(probes, tokens, labels, rows, grid, **kwargs):
        calls.append((probes.num_probes, rows.clone(), list(grid)))
        return fit_probes(probes, tokens, labels, rows, grid, **kwargs)

    monkeypatch.setattr(attentive, "fit_probes", spy)
    grid = probe_grid(3)
    result = attentive_probe(tokens, labels, tokens[:10], labels[:10], num_classes=8, num_heads=HEADS, grid=grid, epochs=2)
    (selection_probes, fit_rows, selection_grid), (refit_probes, refit_rows, refit_grid) = calls
    assert selection_probes == 3 and selection_grid == grid and len(fit_rows) == result.protocol["fit"] < 60
    assert refit_probes == 1 and torch.equal(refit_rows, torch.arange(60)) and result.n_train == 60
    assert refit_grid == [(result.chosen["lr"], result.chosen["weight_decay"])]
    assert result.protocol["fit"] + result.protocol["heldout"] == 60 and len(result.heads) == 3


def test_same_seed_same_result_and_low_precision_tokens():
    tokens, labels = marker_task(80, dim=DIM, seed=4)
    run = dict(num_classes=8, num_heads=HEADS, grid=probe_grid(2), epochs=2, batch_size=16)
    first = attentive_probe(tokens, labels, tokens[:20], labels[:20], **run)
    assert first.to_dict() == attentive_probe(tokens, labels, tokens[:20], labels[:20], **run).to_dict()
    assert first.to_dict() != attentive_probe(tokens, labels, tokens[:20], labels[:20], seed=1, **run).to_dict()
    # Tokens stored in bf16 are read as float32: the same run as on their float32 copy.
    low = tokens.bfloat16()
    assert attentive_probe(low, labels, low[:20], labels[:20], **run).to_dict() == attentive_probe(
        low.float(), labels, low[:20].float(), labels[:20], **run).to_dict()


def test_progress_bar_over_epochs_only_when_asked(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tokens, labels = marker_task(40, dim=DIM, seed=5)
    run = dict(num_classes=8, num_heads=HEADS, epochs=3)
    for progress in (False, True):
        monkeypatch.setattr(sys, "stderr", Terminal())
        attentive_probe(tokens, labels, tokens[:10], labels[:10], progress=progress, **run)
        written = sys.stderr.getvalue()
        assert ("3/3" in written and "attentive, refit" in written and "loss=" in written) == progress, written


@pytest.mark.parametrize("change, match", [
    (dict(train_tokens=torch.randn(20, DIM)), "train tokens must be 3-D"),
    (dict(num_heads=5), "not divisible by num_heads 5"),
    (dict(grid=[]), "grid is empty"),
    (dict(grid=[(-1e-3, 0.0)]), "grid lr must be finite and > 0"),
    (dict(grid=[(1e-3, -1.0)]), "grid weight_decay must be finite and >= 0"),
    (dict(val_tokens=torch.randn(10, 4, DIM + 4)), "val tokens 36"),
    (dict(train_labels=torch.zeros(20)), "train labels must be integers"),
    (dict(train_labels=torch.zeros(19, dtype=torch.int64)), "train labels must be 1-D"),
    (dict(val_labels=torch.full((10,), 8)), r"val labels must lie in \[0, num_classes=8\)"),
    (dict(epochs=0), "epochs must be an int >= 1"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
    (dict(warmup_epochs=3, epochs=2), "warmup_epochs"),
])
def test_bad_inputs_name_the_argument(change, match):
    arguments = dict(train_tokens=torch.randn(20, 4, DIM), train_labels=torch.arange(20) % 8, val_tokens=torch.randn(10, 4, DIM),
                     val_labels=torch.arange(10) % 8, num_classes=8, num_heads=HEADS)
    with pytest.raises(ValueError, match=match):
        attentive_probe(**{**arguments, **change})
