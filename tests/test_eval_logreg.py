"""fastjepa.eval.logreg: the same objective and top-1 as scikit-learn's LogisticRegression on
digits features (a random ViT's and a random projection's, low-shot and full, ten classes and
two), the preprocessing, the default lambd, sanity levels and bad input."""

import pytest
import torch

pytest.importorskip("sklearn")

from fastjepa.eval.datasets import Split, load_digits  # noqa: E402
from fastjepa.eval.features import extract  # noqa: E402
from fastjepa.eval.logreg import _objective, _preprocess, _sklearn_fit, logreg_probe, sklearn_logreg_top1  # noqa: E402
from fastjepa.eval.subsets import class_balanced_subset  # noqa: E402
from fastjepa.models.vision_transformer import vit_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits(image_size=32)


@pytest.fixture(scope="module")
def vit_features(digits):
    """Mean-pooled tokens of a random two-block ViT-Tiny (32 px, 8 px patches): 192-d, 1,258 train / 539 val."""
    train_images, train_labels, val_images, val_labels = digits
    torch.manual_seed(0)
    encoder = vit_tiny(img_size=[32], patch_size=8, depth=2)
    def pooled(images, labels):
        return extract(encoder, Split("digits", labels, [str(d) for d in range(10)], [str(i) for i in range(len(labels))], images=images),
                       ("last",), 32, progress=False)["last"]

    return pooled(train_images, train_labels), train_labels, pooled(val_images, val_labels), val_labels


@pytest.fixture(scope="module")
def projection_features():
    """Digits (8x8) through a fixed random 64 -> 192 projection and a ReLU."""
    train_images, train_labels, val_images, val_labels = load_digits(image_size=8)
    projection = torch.randn(192, 64, generator=torch.Generator().manual_seed(0)) / 8
    features = [torch.relu(images[:, 0].flatten(1).float() / 255 @ projection.T) for images in (train_images, val_images)]
    return features[0], train_labels, features[1], val_labels


def sklearn_objective(train, labels, val, lambd):
    """logreg_probe's objective at scikit-learn's solution (fp64)."""
    x_train, _ = _preprocess(train, val, torch.float64)
    weight, classes = _sklearn_fit(x_train, labels, lambd)
    assert torch.equal(classes, labels.unique())
    return float(_objective(weight, x_train, labels, lambd))


def assert_agrees_with_sklearn(train, train_labels, val, val_labels, num_classes):
    result = logreg_probe(train, train_labels, val, val_labels, num_classes=num_classes)
    reference_top1 = sklearn_logreg_top1(train, train_labels, val, val_labels)
    reference_objective = sklearn_objective(train, train_labels, val, result.protocol["lambd"])
    assert result.protocol["stopped_by"] == "gradient tolerance" and result.protocol["lambd"] == pytest.approx(0.00025 / len(train))
    assert abs(result.top1 - reference_top1) <= 0.01, (result.top1, reference_top1)
    assert result.protocol["objective"] == pytest.approx(reference_objective, rel=1e-4)
    return result, reference_top1


@pytest.mark.parametrize("per_class", [5, 20])
def test_low_shot_vit_features_match_sklearn(vit_features, per_class):
    """5 and 20 images per class of the random ViT's features: top-1 within a point of
    scikit-learn's, objective within 1e-4 relative (measured: equal top-1, ~1e-8)."""
    train, train_labels, val, val_labels = vit_features
    subset = class_balanced_subset(train_labels, per_class=per_class, seed=0)
    result, _ = assert_agrees_with_sklearn(train[subset], train_labels[subset], val, val_labels, 10)
    assert result.n_train == 10 * per_class and result.top1 > 0.3


def test_full_projection_features_match_sklearn(projection_features):
    result, _ = assert_agrees_with_sklearn(*projection_features, 10)
    assert result.top1 > 0.95


def test_two_classes_match_sklearn(vit_features):
    """scikit-learn fits one vector for two classes (C doubled to keep the objective): the same minimum."""
    train, train_labels, val, val_labels = vit_features
    keep, keep_val = train_labels >= 8, val_labels >= 8
    assert_agrees_with_sklearn(train[keep], train_labels[keep] - 8, val[keep_val], val_labels[keep_val] - 8, 2)


def test_features_are_centred_and_row_normalised():
    """Train rows centred by their mean and L2-normalised, val with the train mean: a common shift
    and scale of train and val leaves the result unchanged."""
    generator = torch.Generator().manual_seed(0)
    train, val = torch.randn(60, 8, generator=generator, dtype=torch.float64), torch.randn(30, 8, generator=generator, dtype=torch.float64)
    labels, val_labels = torch.arange(3).repeat(20), torch.arange(3).repeat(10)
    base = logreg_probe(train, labels, val, val_labels, num_classes=3)
    shift = torch.randn(8, generator=generator, dtype=torch.float64) * 5
    moved = logreg_probe(3 * train + shift, labels, 3 * val + shift, val_labels, num_classes=3)
    assert moved.top1 == base.top1 and moved.protocol["objective"] == pytest.approx(base.protocol["objective"], rel=1e-8)
    x_train, x_val = _preprocess(train, val, torch.float64)
    mean = train.mean(dim=0)
    torch.testing.assert_close(x_train.norm(dim=1), torch.ones(60, dtype=torch.float64))
    torch.testing.assert_close(x_train, torch.nn.functional.normalize(train - mean, dim=1))
    torch.testing.assert_close(x_val, torch.nn.functional.normalize(val - mean, dim=1))


def test_one_image_per_class_and_result_fields():
    """Extreme low shot: one image per class trains (nothing is held out); one head, no selection."""
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 16, generator=generator) * 3
    train = centres + 0.1 * torch.randn(4, 16, generator=generator)
    val_labels = torch.arange(4).repeat(5)
    val = centres[val_labels] + 0.1 * torch.randn(20, 16, generator=generator)
    result = logreg_probe(train, torch.arange(4), val, val_labels, num_classes=4, lambd=1e-3)
    assert result.top1 == 1.0 and result.method == "logreg" and result.n_train == 4 and result.n_val == 20
    assert result.chosen == {"lambd": 1e-3, "heldout_top1": None} and result.heads == [{"lambd": 1e-3, "heldout_top1": None, "val_top1": 1.0}]
    assert result.protocol["lambd_rule"] == "given" and result.protocol["iterations"] > 0 and "L-BFGS" in result.protocol["solver"]


def test_random_labels_near_chance():
    generator = torch.Generator().manual_seed(2)
    train, val = torch.randn(300, 32, generator=generator), torch.randn(400, 32, generator=generator)
    labels, val_labels = torch.randint(0, 4, (300,), generator=generator), torch.randint(0, 4, (400,), generator=generator)
    assert abs(logreg_probe(train, labels, val, val_labels, num_classes=4, lambd=1e-2).top1 - 0.25) < 0.08


def test_max_iter_stops_early_and_says_so(projection_features):
    result = logreg_probe(*projection_features, num_classes=10, max_iter=3)
    assert result.protocol["iterations"] == 3 and result.protocol["stopped_by"] == "max_iter" and not result.protocol["converged"]


def test_bad_inputs_name_the_argument():
    train, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    cases = [
        ((train, labels[:-1], train, labels), {}, r"train_labels must have shape \(6,\)"),
        ((train, labels, train[:, :3], labels), {}, r"train has 4 feature dimensions, val 3"),
        ((train[0], labels, train, labels), {}, r"train must be a float \(N, D\) tensor"),
        ((train, labels, train.long(), labels), {}, r"val must be a float \(N, D\) tensor"),
        ((train, labels.float(), train, labels), {}, r"train_labels must be an integer tensor"),
        ((train, labels, train, labels + 1), {}, r"val_labels must lie in \[0, num_classes=3\)"),
        ((train, labels - 1, train, labels), {}, r"train_labels must lie in"),
        ((train, labels, train, labels), {"lambd": -1.0}, r"lambd must be a number > 0"),
        ((train, labels, train, labels), {"max_iter": 0}, r"max_iter must be an int >= 1"),
        ((train, labels, train, labels), {"num_classes": 1}, r"num_classes must be an int >= 2"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            logreg_probe(*args, **{"num_classes": 3, **kwargs})
    with pytest.raises(ValueError, match=r"val_labels must be an integer tensor"):
        sklearn_logreg_top1(train, labels, train, labels.double())
