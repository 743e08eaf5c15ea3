"""fastjepa.eval.linear: the vectorized SGD / LARS step against torch.optim.SGD and a per-tensor
LARS, the bn head against BatchNorm1d + Linear, the one-pass grid against each head trained alone,
selection on held-out only, the refit on all images, determinism, sanity levels and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastjepa.eval import linear
from fastjepa.eval.datasets import load_digits
from fastjepa.eval.linear import LR_GRID, _epoch_batches, _HeadGrid, _train, _update, linear_probe
from fastjepa.eval.results import format_table

pytestmark = pytest.mark.usefixtures("one_thread")


def clusters(n_per_class: int, classes: int, dim: int, spread: float, seed: int, centres: torch.Tensor | None = None):
    """Gaussian clusters around random centres (or the given ones): (features, labels, centres)."""
    generator = torch.Generator().manual_seed(seed)
    if centres is None:
        centres = torch.randn(classes, dim, generator=generator) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels, centres


def head_slices(grid: _HeadGrid):
    """(setting, group, index in the group) for every head of ``grid``, in grid order."""
    return [(setting, group, i) for group in grid.groups for i, setting in enumerate(
        {"features": group.features, "head": group.head, "lr": lr, "weight_decay": wd} for lr, wd in group.settings)]


# ------------------------------------------------------------------------- the update


def test_update_equals_torch_sgd_per_head():
    """Momentum, coupled L2 on weights only, a changing lr: each head's slice follows torch.optim.SGD (fp64, 1e-12)."""
    generator = torch.Generator().manual_seed(0)
    lrs, wds = torch.tensor([0.5, 0.1, 0.02], dtype=torch.float64), torch.tensor([0.0, 5e-4, 0.1], dtype=torch.float64)
    weight, bias = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64), torch.randn(3, 4, generator=generator, dtype=torch.float64)
    buffers = [torch.zeros_like(weight), torch.zeros_like(bias)]
    references = []
    for h in range(3):
        w, b = weight[h].clone().requires_grad_(), bias[h].clone().requires_grad_()
        optimizer = torch.optim.SGD([{"params": [w], "weight_decay": float(wds[h])}, {"params": [b], "weight_decay": 0.0}], lr=float(lrs[h]), momentum=0.9)
        references.append((w, b, optimizer))
    for step in range(5):
        factor = 0.5 * (1 + math.cos(math.pi * step / 5))
        grads = torch.randn(weight.shape, generator=generator, dtype=torch.float64), torch.randn(bias.shape, generator=generator, dtype=torch.float64)
        _update(weight, grads[0], buffers[0], lrs * factor, wds, lars=False)
        _update(bias, grads[1], buffers[1], lrs * factor, None, lars=False)
        for h, (w, b, optimizer) in enumerate(references):
            w.grad, b.grad = grads[0][h].clone(), grads[1][h].clone()
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[h]) * factor
            optimizer.step()
    for h, (w, b, _) in enumerate(references):
        torch.testing.assert_close(weight[h], w.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bias[h], b.detach(), rtol=1e-12, atol=1e-12)


def test_update_lars_equals_per_tensor_lars():
    """LARS: trust 0.001 |w| / |g + wd w| per head (1 for a zero weight), none on biases (fp64, 1e-12)."""
    generator = torch.Generator().manual_seed(1)
    lrs, wds = torch.tensor([2.0, 0.5], dtype=torch.float64), torch.tensor([0.0, 1e-3], dtype=torch.float64)
    weight = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    weight[0] = 0.0  # a zero-initialised head: trust ratio 1 on its first step
    bias = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    expected_weight, expected_bias = weight.clone(), bias.clone()
    buffers, expected_buffers = [torch.zeros_like(weight), torch.zeros_like(bias)], [torch.zeros_like(weight), torch.zeros_like(bias)]
    for _ in range(4):
        grads = torch.randn(weight.shape, generator=generator, dtype=torch.float64), torch.randn(bias.shape, generator=generator, dtype=torch.float64)
        _update(weight, grads[0], buffers[0], lrs, wds, lars=True)
        _update(bias, grads[1], buffers[1], lrs, None, lars=True)
        for h in range(2):
            update = grads[0][h] + wds[h] * expected_weight[h]
            w_norm, u_norm = expected_weight[h].norm(), update.norm()
            trust = 0.001 * w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            expected_buffers[0][h] = 0.9 * expected_buffers[0][h] + trust * update
            expected_weight[h] -= lrs[h] * expected_buffers[0][h]
            expected_buffers[1][h] = 0.9 * expected_buffers[1][h] + grads[1][h]
            expected_bias[h] -= lrs[h] * expected_buffers[1][h]
    torch.testing.assert_close(weight, expected_weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bias, expected_bias, rtol=1e-12, atol=1e-12)


def test_epoch_batches_shuffle_every_image_once_in_near_equal_batches():
    """ceil(n / batch_size) batches differing by at most one image (no tiny last batch for the
    batch norm), each epoch a new seeded order, the same orders for the same seed."""
    indices = torch.arange(100, 170)
    generator = torch.Generator().manual_seed(0)
    epochs = [_epoch_batches(indices, 32, generator) for _ in range(2)]
    for batches in epochs:
        assert [len(batch) for batch in batches] == [24, 23, 23]
        assert torch.equal(torch.cat(batches).sort().values, indices)
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1])) and not torch.equal(torch.cat(epochs[0]), indices)
    again = _epoch_batches(indices, 32, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(again, epochs[0]))


def test_lr_is_scaled_by_batch_size_over_256(monkeypatch):
    train, labels, _ = clusters(20, 2, 4, 1.0, seed=24)
    lrs = []
    real_train = linear._train
    monkeypatch.setattr(linear, "_train", lambda grid, *args, **kw: lrs.append(grid.groups[0].lr.tolist()) or real_train(grid, *args, **kw))
    result = linear_probe({"x": train}, labels, {"x": train}, labels, num_classes=2, epochs=1, lrs=(0.1, 0.4), weight_decays=(0.0,), heads=("linear",),
                          batch_size=64)
    assert lrs[0] == pytest.approx([0.025, 0.1]) and lrs[1] == pytest.approx([0.25 * result.chosen["lr"]])
    assert "lr * 0.25" in result.protocol["lr_scaling"]


# --------------------------------------------------------------------------- the heads


def reference_head(setting: dict, dim: int, classes: int) -> tuple[nn.Module, nn.Linear]:
    linear_layer = nn.Linear(dim, classes).double()
    nn.init.zeros_(linear_layer.weight)
    nn.init.zeros_(linear_layer.bias)
    layers = [nn.BatchNorm1d(dim).double(), linear_layer] if setting["head"] == "bn" else [linear_layer]
    return nn.Sequential(*layers), linear_layer


def test_bn_head_equals_batchnorm1d_then_linear():
    """Random affine and weights: train-mode logits, running statistics and eval-mode logits of every bn head equal the modules' (fp64)."""
    generator = torch.Generator().manual_seed(2)
    settings = [{"features": "x", "head": "bn", "lr": lr, "weight_decay": 0.0} for lr in (0.1, 0.2, 0.3)]
    grid = _HeadGrid(settings, {"x": 7}, 5, 1.0, torch.float64, torch.device("cpu"))
    group = grid.groups[0]
    with torch.no_grad():
        for tensor in (group.weight, group.bias, group.bn_weight, group.bn_bias):
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float64))
    batches = [torch.randn(16, 7, generator=generator, dtype=torch.float64) * 3 + 1 for _ in range(3)]
    modules = []
    for h, setting in enumerate(settings):
        module, layer = reference_head(setting, 7, 5)
        with torch.no_grad():
            module[0].weight.copy_(group.bn_weight[h])
            module[0].bias.copy_(group.bn_bias[h])
            layer.weight.copy_(group.weight[h].T)
            layer.bias.copy_(group.bias[h])
        modules.append(module)
    for batch in batches:
        logits = grid.logits({"x": batch}, training=True)[0]
        for h, module in enumerate(modules):
            torch.testing.assert_close(logits[..., h], module.train()(batch), rtol=1e-10, atol=1e-10)
    mean, var = grid.running["x"]
    torch.testing.assert_close(mean, modules[0][0].running_mean)
    torch.testing.assert_close(var, modules[0][0].running_var)
    logits = grid.logits({"x": batches[0]}, training=False)[0]
    for h, module in enumerate(modules):
        torch.testing.assert_close(logits[..., h], module.eval()(batches[0]), rtol=1e-10, atol=1e-10)


def grid_data(dtype: torch.dtype):
    a, labels, _ = clusters(30, 3, 6, 2.0, seed=3)
    b = torch.cat([a, a.pow(2)], dim=1) + torch.randn(len(a), 12, generator=torch.Generator().manual_seed(4))
    return {"a": a.to(dtype), "b": b.to(dtype)}, labels


GRID = [{"features": name, "head": head, "lr": lr, "weight_decay": wd}
        for name in ("a", "b") for head in ("linear", "bn") for lr in (0.05, 0.5) for wd in (0.0, 0.01)]


@pytest.mark.parametrize("lars", [False, True])
def test_one_pass_grid_equals_torch_sgd_head_by_head(lars):
    """16 heads (2 feature sets x linear/bn x 2 lr x 2 wd) in one pass: with SGD, each equals
    BatchNorm1d + Linear trained alone by torch.optim.SGD (momentum 0.9, weight decay on the weight
    only, cosine per step, the same batches); fp64, 1e-9. With LARS, each equals its grid of one."""
    features, labels = grid_data(torch.float64)
    indices = torch.arange(5, 90)  # a subset, as in the selection phase
    epochs, batch_size, seed = 3, 16, 7
    grid = _HeadGrid(GRID, {"a": 6, "b": 12}, 3, batch_size / 256, torch.float64, torch.device("cpu"))
    _train(grid, lambda epoch: features, labels, indices, epochs=epochs, batch_size=batch_size, lars=lars, seed=seed, bar=None)
    for setting, group, h in head_slices(grid):
        if lars:
            alone = _HeadGrid([setting], {"a": 6, "b": 12}, 3, batch_size / 256, torch.float64, torch.device("cpu"))
            _train(alone, lambda epoch: features, labels, indices, epochs=epochs, batch_size=batch_size, lars=True, seed=seed, bar=None)
            for ours, theirs in zip(group.parameters(), alone.groups[0].parameters()):
                torch.testing.assert_close(ours[0][h], theirs[0][0], rtol=1e-9, atol=1e-9)
            continue
        module, layer = reference_head(setting, features[setting["features"]].shape[1], 3)
        rest = [p for p in module.parameters() if p is not layer.weight]
        optimizer = torch.optim.SGD([{"params": [layer.weight], "weight_decay": setting["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
                                    lr=setting["lr"] * batch_size / 256, momentum=0.9)
        steps = epochs * math.ceil(len(indices) / batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for batch in _epoch_batches(indices, batch_size, generator):
                optimizer.zero_grad()
                F.cross_entropy(module(features[setting["features"]][batch]), labels[batch]).backward()
                optimizer.step()
                schedule.step()
        torch.testing.assert_close(group.weight[h], layer.weight.detach().T, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(group.bias[h], layer.bias.detach(), rtol=1e-9, atol=1e-9)
        if setting["head"] == "bn":
            torch.testing.assert_close(group.bn_weight[h], module[0].weight.detach(), rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(group.bn_bias[h], module[0].bias.detach(), rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(grid.running[setting["features"]][0], module[0].running_mean)
            torch.testing.assert_close(grid.running[setting["features"]][1], module[0].running_var)


def test_one_pass_grid_equals_each_head_alone_fp32():
    """float32 features: every head of the 16-head grid ends within 1e-5 (relative to its largest
    weight) of the same head trained alone; only the order of float sums differs."""
    features, labels = grid_data(torch.float32)
    grid = _HeadGrid(GRID, {"a": 6, "b": 12}, 3, 1.0, torch.float32, torch.device("cpu"))
    _train(grid, lambda epoch: features, labels, torch.arange(90), epochs=4, batch_size=32, lars=False, seed=0, bar=None)
    for setting, group, h in head_slices(grid):
        alone = _HeadGrid([setting], {"a": 6, "b": 12}, 3, 1.0, torch.float32, torch.device("cpu"))
        _train(alone, lambda epoch: features, labels, torch.arange(90), epochs=4, batch_size=32, lars=False, seed=0, bar=None)
        for ours, theirs in zip(group.parameters(), alone.groups[0].parameters()):
            scale = theirs[0][0].abs().max().item()
            torch.testing.assert_close(ours[0][h], theirs[0][0], rtol=0, atol=1e-5 * scale)


def test_a_diverging_head_leaves_the_others_alone():
    """lr 1e8 blows its heads up (non-finite weights); the lr 0.1 heads beside them train as they would alone."""
    features, labels = grid_data(torch.float32)
    settings = [{"features": "a", "head": head, "lr": lr, "weight_decay": 0.0} for head in ("linear", "bn") for lr in (0.1, 1e8)]
    grid = _HeadGrid(settings, {"a": 6}, 3, 1.0, torch.float32, torch.device("cpu"))
    _train(grid, lambda epoch: features, labels, torch.arange(90), epochs=10, batch_size=16, lars=False, seed=0, bar=None)
    assert not grid.groups[1].weight[1].isfinite().all()
    for group in grid.groups:
        alone = _HeadGrid([{"features": "a", "head": group.head, "lr": 0.1, "weight_decay": 0.0}], {"a": 6}, 3, 1.0, torch.float32, torch.device("cpu"))
        _train(alone, lambda epoch: features, labels, torch.arange(90), epochs=10, batch_size=16, lars=False, seed=0, bar=None)
        torch.testing.assert_close(group.weight[0], alone.groups[0].weight[0], rtol=0, atol=1e-5 * alone.groups[0].weight.abs().max().item())


def test_grid_and_single_head_probes_score_alike():
    """Through linear_probe (fp64): a head's held-out and val top-1 are the same in the 52-head grid and alone."""
    train, train_labels, centres = clusters(40, 4, 10, 4.0, seed=5)
    val, val_labels, _ = clusters(20, 4, 10, 4.0, seed=6, centres=centres)
    features, val_features = {"x": train.double()}, {"x": val.double()}
    grid = linear_probe(features, train_labels, val_features, val_labels, num_classes=4, epochs=5)
    assert len(grid.heads) == 2 * 13 * 2
    for head in grid.heads[::7]:
        alone = linear_probe(features, train_labels, val_features, val_labels, num_classes=4, epochs=5, lrs=(head["lr"],),
                             weight_decays=(head["weight_decay"],), heads=(head["head"],))
        assert alone.heads == [head]


# --------------------------------------------------------------------------- selection


def test_selection_follows_heldout_not_val():
    """Feature set "a" is clean on train and noise on val; "b" is noisy on train and clean on
    val. Held-out prefers "a", val prefers "b": the choice is "a"."""
    a_train, labels, centres = clusters(50, 4, 8, 0.3, seed=7)
    b_train, _, _ = clusters(50, 4, 8, 6.0, seed=8, centres=centres)
    b_val, val_labels, _ = clusters(25, 4, 8, 0.3, seed=9, centres=centres)
    a_val = torch.randn(b_val.shape, generator=torch.Generator().manual_seed(10)) * 3
    result = linear_probe({"a": a_train, "b": b_train}, labels, {"a": a_val, "b": b_val}, val_labels, num_classes=4, epochs=10,
                          lrs=(0.1,), weight_decays=(0.0,), heads=("linear",))
    a, b = result.heads
    assert a["heldout_top1"] > b["heldout_top1"] and b["val_top1"] > a["val_top1"] + 0.3  # the two criteria disagree
    assert result.chosen == {"features": "a", "head": "linear", "lr": 0.1, "weight_decay": 0.0, "heldout_top1": a["heldout_top1"],
                             "heldout_loss": pytest.approx(result.chosen["heldout_loss"])} and result.chosen["heldout_loss"] > 0
    assert result.top1 < 0.5  # the refit of "a" on val's noise


def test_refit_trains_the_chosen_head_on_all_images(monkeypatch):
    """Every image is its own one-hot direction, and val repeats train: a head sees a direction
    only if it trained on that image. The selection head misses the held-out images; the refit
    gets all 40 right, and _train saw 36 then 40 images."""
    labels = torch.arange(4).repeat(10)
    features = torch.eye(40)
    calls = []
    real_train = linear._train
    monkeypatch.setattr(linear, "_train", lambda grid, epoch_features, labels, indices, **kw: calls.append(len(indices)) or real_train(
        grid, epoch_features, labels, indices, **kw))
    result = linear_probe({"x": features}, labels, {"x": features}, labels, num_classes=4, epochs=30, lrs=(0.5,), weight_decays=(0.0,),
                          heads=("linear",))
    assert calls == [36, 40]
    assert result.n_train == 40 and result.protocol["n_fit"] == 36 and result.protocol["n_heldout"] == 4
    assert result.heads[0]["val_top1"] <= 37 / 40  # at most one of the 4 unseen images by luck
    assert result.top1 == 1.0


def test_top1_ties_go_to_the_lower_heldout_loss_then_the_first_setting(monkeypatch):
    """Far-apart clusters: every head is perfect on held-out. The head with the lowest held-out
    cross-entropy is chosen; "a" repeats "b", so each of b's heads ties one of a's exactly, and
    the first feature set given wins."""
    train, labels, centres = clusters(20, 3, 5, 0.1, seed=11)
    val, val_labels, _ = clusters(10, 3, 5, 0.1, seed=12, centres=centres)
    losses = []
    real_scores = linear._HeadGrid.scores
    monkeypatch.setattr(linear._HeadGrid, "scores", lambda grid, *a: losses.append(real_scores(grid, *a)[1]) or real_scores(grid, *a))
    result = linear_probe({"b": train, "a": train.clone()}, labels, {"a": val, "b": val}, val_labels, num_classes=3, epochs=3,
                          lrs=(0.1, 0.01), weight_decays=(5e-4, 0.0), heads=("bn", "linear"))
    assert all(head["heldout_top1"] == 1.0 for head in result.heads)
    heldout_loss = losses[0]
    best = min(range(len(heldout_loss)), key=heldout_loss.__getitem__)
    chosen = {k: result.chosen[k] for k in ("features", "head", "lr", "weight_decay")}
    assert chosen == {k: result.heads[best][k] for k in chosen} and chosen["features"] == "b"
    assert result.chosen["heldout_loss"] == heldout_loss[best] < sorted(heldout_loss)[2]  # b's and a's copy tie; the rest lose
    assert "<- chosen" in format_table(result) and format_table(result).count("<- chosen") == 1


def test_same_seed_same_result_different_seed_different_heldout(monkeypatch):
    train, labels, centres = clusters(30, 3, 6, 2.5, seed=13)
    val, val_labels, _ = clusters(10, 3, 6, 2.5, seed=14, centres=centres)
    heldouts = []
    real_split = linear.holdout_split
    monkeypatch.setattr(linear, "holdout_split", lambda *args: heldouts.append(real_split(*args)[1]) or real_split(*args))
    run = {"num_classes": 3, "epochs": 4, "lrs": (0.01, 0.1), "weight_decays": (0.0,)}
    first, again, other = (linear_probe({"x": train}, labels, {"x": val}, val_labels, seed=seed, **run) for seed in (0, 0, 1))
    assert first.to_dict() == again.to_dict()
    assert torch.equal(heldouts[0], heldouts[1]) and not torch.equal(heldouts[0], heldouts[2])
    assert [h["heldout_top1"] for h in first.heads] != [h["heldout_top1"] for h in other.heads]
    assert other.protocol["seed"] == 1


# ----------------------------------------------------------------------------- levels


def test_separable_features_near_100_percent():
    train, labels, centres = clusters(40, 5, 16, 0.5, seed=15)
    val, val_labels, _ = clusters(40, 5, 16, 0.5, seed=16, centres=centres)
    result = linear_probe({"x": train}, labels, {"x": val}, val_labels, num_classes=5, epochs=10)
    assert result.top1 >= 0.99


def test_random_labels_near_chance():
    generator = torch.Generator().manual_seed(17)
    train, val = torch.randn(400, 32, generator=generator), torch.randn(400, 32, generator=generator)
    labels, val_labels = torch.randint(0, 4, (400,), generator=generator), torch.randint(0, 4, (400,), generator=generator)
    result = linear_probe({"x": train}, labels, {"x": val}, val_labels, num_classes=4, epochs=20)
    assert abs(result.top1 - 0.25) < 0.08


@pytest.fixture(scope="module")
def digits_features():
    """Digits (8x8) through a fixed random 64 -> 192 projection and a ReLU: 1,258 train and 539 val images, 10 classes."""
    train_images, train_labels, val_images, val_labels = load_digits(image_size=8)
    projection = torch.randn(192, 64, generator=torch.Generator().manual_seed(0)) / 8
    features = [torch.relu(images[:, 0].flatten(1).float() / 255 @ projection.T) for images in (train_images, val_images)]
    return features[0], train_labels, features[1], val_labels


def test_defaults_within_one_point_of_logreg_on_digits(digits_features):
    """The default grid and epochs on ~1,000 images, 10 classes, 192-d: the chosen head is within
    1 point of (or better than) the full-batch logistic regression."""
    from fastjepa.eval.logreg import logreg_probe

    train, train_labels, val, val_labels = digits_features
    result = linear_probe({"last": train}, train_labels, {"last": val}, val_labels, num_classes=10)
    reference = logreg_probe(train, train_labels, val, val_labels, num_classes=10)
    assert len(result.heads) == 52 and result.protocol["epochs"] == linear.MIN_STEPS // 5  # 1,258 images: 5 steps per epoch
    assert result.top1 >= reference.top1 - 0.01, (result.top1, reference.top1)


def test_lars_learns_separable_features():
    train, labels, centres = clusters(40, 4, 16, 0.5, seed=18)
    val, val_labels, _ = clusters(20, 4, 16, 0.5, seed=19, centres=centres)
    result = linear_probe({"x": train}, labels, {"x": val}, val_labels, num_classes=4, epochs=5, optimizer="lars", lrs=LR_GRID[-3:])
    assert result.top1 >= 0.99 and result.protocol["optimizer"] == "lars" and result.protocol["lars_trust_coefficient"] == 0.001


def test_callable_train_features_are_fetched_per_epoch():
    """A callable gets epochs 0..E-1 for the selection then again for the refit; returning fixed
    features it gives exactly the dict's result. A changed shape mid-run names the epoch."""
    train, labels, centres = clusters(20, 3, 6, 1.0, seed=20)
    val, val_labels, _ = clusters(10, 3, 6, 1.0, seed=21, centres=centres)
    asked = []
    run = {"num_classes": 3, "epochs": 3, "lrs": (0.01, 0.1), "weight_decays": (0.0,)}
    fixed = linear_probe({"x": train}, labels, {"x": val}, val_labels, **run)
    fetched = linear_probe(lambda epoch: asked.append(epoch) or {"x": train}, labels, {"x": val}, val_labels, **run)
    assert asked == [0, 1, 2, 0, 1, 2]
    assert fetched.top1 == fixed.top1 and fetched.heads == fixed.heads and fetched.protocol["augmented"]
    with pytest.raises(ValueError, match=r"train\(2\)"):
        linear_probe(lambda epoch: {"x": train if epoch < 2 else train[:, :3]}, labels, {"x": val}, val_labels, **run)


def test_progress_bar_and_protocol(capsys):
    train, labels, centres = clusters(10, 2, 4, 1.0, seed=22)
    result = linear_probe({"x": train}, labels, {"x": train}, labels, num_classes=2, epochs=2, lrs=(0.1,), progress=True)
    assert set(result.protocol) >= {"epochs", "batch_size", "optimizer", "lr_scaling", "holdout", "seed", "refit", "selection"}
    assert "all 20 train images" in result.protocol["refit"] and result.protocol["batch_size"] == 256


# ------------------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_argument():
    train, labels, _ = clusters(10, 2, 4, 1.0, seed=23)
    good = ({"x": train}, labels, {"x": train}, labels)

    def probe(*args, **kwargs):
        return linear_probe(*args, **{"num_classes": 2, "epochs": 1, **kwargs})

    cases = [
        (({"x": train}, labels[:-1], {"x": train}, labels), {}, r"train\['x'\]"),
        (({"x": train}, labels, {"x": train[:, :3]}, labels), {}, r"val\['x'\] has 3 dimensions"),
        (({"x": train, "y": train}, labels, {"x": train}, labels), {}, r"val lacks the train feature set 'y'"),
        (({"x": train.long()}, labels, {"x": train}, labels), {}, r"train\['x'\] must be a float"),
        (({}, labels, {"x": train}, labels), {}, r"train must be a non-empty dict"),
        (({"x": train}, labels.float(), {"x": train}, labels), {}, r"train_labels must be an integer tensor"),
        (({"x": train}, labels, {"x": train}, labels + 1), {}, r"val_labels must lie in \[0, num_classes=2\)"),
        (good, {"lrs": ()}, r"lrs must be a non-empty sequence"),
        (good, {"lrs": (0.1, -1.0)}, r"lrs must be finite and > 0"),
        (good, {"weight_decays": (0.0, -1e-4)}, r"weight_decays must be finite and >= 0"),
        (good, {"heads": ("linear", "mlp")}, r"unknown head type 'mlp' in heads"),
        (good, {"optimizer": "adam"}, r"unknown optimizer 'adam'"),
        (good, {"epochs": 0}, r"epochs must be an int >= 1"),
        (good, {"batch_size": 0}, r"batch_size must be an int >= 1"),
        (good, {"batch_size": 1}, r"batch_size must be >= 2 with them"),
        (good, {"num_classes": 1}, r"num_classes must be an int >= 2"),
        (good, {"holdout": 1.0}, r"holdout fraction must be in \(0, 1\)"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            probe(*args, **kwargs)
