"""fastjepa.eval: the digits data, kNN and linear probes, pooled features,
encoders from checkpoints (round trip and failures) and evaluate end to end."""

import copy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")

from fastjepa import eval as fe  # noqa: E402
from fastjepa.data.normalize import normalize  # noqa: E402
from fastjepa.helper import CheckpointError, init_model, save_checkpoint  # noqa: E402
from fastjepa.models.vision_transformer import vit_tiny  # noqa: E402

CONFIG = {
    "data": {"crop_size": 32},
    "logging": {},
    "mask": {"patch_size": 8},
    "meta": {"model_name": "vit_tiny"},
    "optimization": {},
}


@pytest.fixture(scope="module")
def digits16():
    return fe.load_digits(image_size=16)


@pytest.fixture(scope="module")
def small_vit():
    """A random two-block ViT-Tiny at 32 px with 8 px patches: fast on one thread."""
    torch.manual_seed(0)
    return vit_tiny(img_size=[32], patch_size=8, depth=2).eval()


@pytest.fixture(scope="module")
def trained_models():
    torch.manual_seed(0)
    encoder, predictor = init_model("cpu", patch_size=8, model_name="vit_tiny", crop_size=32, pred_depth=1, pred_emb_dim=48)
    target = copy.deepcopy(encoder)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))  # so that "encoder" and "target_encoder" differ
    return encoder, predictor, target


def prefixed(model):
    return {f"module.{k}": v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def checkpoint_path(trained_models, tmp_path_factory):
    encoder, predictor, target = trained_models
    path = tmp_path_factory.mktemp("ckpt") / "latest.pth.tar"
    state = {
        "encoder": prefixed(encoder),
        "predictor": prefixed(predictor),
        "target_encoder": prefixed(target),
        "opt": {},
        "epoch": 3,
        "fastjepa": {"config": CONFIG},
    }
    save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def reference_checkpoint_path(trained_models, tmp_path_factory):
    """Like a reference trainer's checkpoint: no fastjepa config, no prefixes."""
    encoder, predictor, target = trained_models
    path = tmp_path_factory.mktemp("ref") / "ijepa-latest.pth.tar"
    state = {
        "encoder": encoder.state_dict(),
        "predictor": predictor.state_dict(),
        "target_encoder": target.state_dict(),
        "epoch": 1,
    }
    save_checkpoint(state, path)
    return path


def assert_same_weights(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


# ------------------------------------------------------------------------- digits


def test_load_digits_shapes_dtypes_and_values(digits16):
    train_x, train_y, test_x, test_y = digits16
    assert len(train_x) + len(test_x) == 1797
    assert train_x.shape[1:] == test_x.shape[1:] == (3, 16, 16)
    assert train_x.dtype == test_x.dtype == torch.uint8
    assert train_y.dtype == test_y.dtype == torch.int64
    assert len(train_y) == len(train_x) and len(test_y) == len(test_x)
    assert torch.equal(train_x[:, 0], train_x[:, 1]) and torch.equal(train_x[:, 0], train_x[:, 2])
    assert int(train_x.max()) == 255 and int(train_x.min()) == 0
    assert set(train_y.tolist()) == set(test_y.tolist()) == set(range(10))


def test_load_digits_native_size_scales_grey_levels():
    from sklearn.datasets import load_digits

    train_x, train_y, test_x, test_y = fe.load_digits(image_size=8)
    raw = np.round(load_digits().images * 255 / 16)
    ours = np.sort(torch.cat([train_x, test_x])[:, 0].numpy().reshape(1797, -1), axis=0)
    assert np.array_equal(ours, np.sort(raw.reshape(1797, -1), axis=0))


def test_load_digits_split_is_stratified_and_deterministic(digits16):
    train_x, train_y, test_x, test_y = digits16
    everything = torch.cat([train_y, test_y])
    for c in range(10):
        count = int((everything == c).sum())
        assert int((test_y == c).sum()) == round(0.3 * count)
    again = fe.load_digits(image_size=16)
    assert all(torch.equal(a, b) for a, b in zip(digits16, again))
    other = fe.load_digits(image_size=16, seed=1)
    assert not torch.equal(other[2], test_x)
    half = fe.load_digits(image_size=8, test_fraction=0.5)
    assert abs(len(half[2]) - 1797 / 2) <= 10


def test_load_digits_bad_arguments_and_missing_sklearn(monkeypatch):
    with pytest.raises(ValueError, match="test_fraction"):
        fe.load_digits(test_fraction=1.0)
    with pytest.raises(ValueError, match="image_size"):
        fe.load_digits(image_size=0)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'fastjepa\[eval\]'"):
        fe.load_digits()


# --------------------------------------------------------------------------- kNN


def clusters(n_per_class, num_classes, dim, spread, seed, noise_seed=None):
    """Gaussian blobs around class centres drawn from ``seed``; the noise (and the
    shuffling) from ``noise_seed``, so a train and a test set can share centres."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed if noise_seed is None else noise_seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    order = torch.randperm(len(labels), generator=g)
    return features[order], labels[order]


def test_knn_separable_clusters_near_perfect():
    train_x, train_y = clusters(50, 5, 32, 0.2, seed=0)
    test_x, test_y = clusters(20, 5, 32, 0.2, seed=0, noise_seed=1)
    assert fe.knn_top1(train_x, train_y, test_x, test_y) >= 0.99


def test_knn_random_labels_near_chance():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    train_y, test_y = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    assert 0.05 < fe.knn_top1(train_x, train_y, test_x, test_y) < 0.16


def test_knn_votes_are_weighted_by_similarity():
    # One neighbour of class 0 at similarity 1, two of class 1 at similarity 0.6.
    train_x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 1, 2])
    test_x, test_y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # exp(1 / 0.07) beats 2 exp(0.6 / 0.07): the nearest neighbour wins.
    assert fe.knn_top1(train_x, train_y, test_x, test_y, k=3, temperature=0.07) == 1.0
    # A huge temperature makes the weights nearly equal: the majority (class 1) wins.
    assert fe.knn_top1(train_x, train_y, test_x, test_y, k=3, temperature=1000.0) == 0.0
    # Feature scale does not matter (cosine similarity), and k=1 is plain nearest neighbour.
    assert fe.knn_top1(100 * train_x, train_y, 0.01 * test_x, test_y, k=1) == 1.0


def test_knn_k_larger_than_train_set_uses_all():
    train_x, train_y = clusters(3, 3, 8, 0.1, seed=2)
    test_x, test_y = clusters(5, 3, 8, 0.1, seed=2, noise_seed=3)
    assert fe.knn_top1(train_x, train_y, test_x, test_y, k=1000) == fe.knn_top1(train_x, train_y, test_x, test_y, k=9)


def reference_knn(train_x, train_y, test_x, test_y, k, temperature):
    """Brute force, one test sample at a time, in float64."""
    train = torch.nn.functional.normalize(train_x.double(), dim=1)
    test = torch.nn.functional.normalize(test_x.double(), dim=1)
    correct = 0
    for x, y in zip(test, test_y):
        sims = train @ x
        top = sims.argsort(descending=True)[:k]
        votes = torch.zeros(int(train_y.max()) + 1, dtype=torch.float64)
        for j in top:
            votes[train_y[j]] += torch.exp(sims[j] / temperature)
        correct += int(votes.argmax() == y)
    return correct / len(test_y)


def test_knn_chunked_matches_brute_force(monkeypatch):
    train_x, train_y = clusters(40, 4, 16, 1.5, seed=3)
    test_x, test_y = clusters(15, 4, 16, 1.5, seed=3, noise_seed=4)
    expected = reference_knn(train_x, train_y, test_x, test_y, k=7, temperature=0.1)
    assert 0.3 < expected < 1.0  # a non-trivial case
    monkeypatch.setattr(fe, "KNN_CHUNK_ELEMENTS", 7 * len(train_x))  # chunks of 7 test samples
    assert fe.knn_top1(train_x, train_y, test_x, test_y, k=7, temperature=0.1) == pytest.approx(expected)


def test_knn_bad_inputs():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="train set is empty"):
        fe.knn_top1(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match="test set is empty"):
        fe.knn_top1(x, y, x[:0], y[:0])
    with pytest.raises(ValueError, match="labels"):
        fe.knn_top1(x, y[:3], x, y)
    with pytest.raises(ValueError, match="dimensions"):
        fe.knn_top1(x, y, torch.randn(4, 5), y)
    with pytest.raises(ValueError, match="k must be"):
        fe.knn_top1(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="temperature"):
        fe.knn_top1(x, y, x, y, temperature=0.0)


# ------------------------------------------------------------------- linear probe


def test_linear_probe_separable_and_deterministic():
    train_x, train_y = clusters(60, 6, 24, 0.5, seed=5)
    test_x, test_y = clusters(20, 6, 24, 0.5, seed=5, noise_seed=6)
    # A large offset and scale: the probe standardises with the train statistics.
    train_x, test_x = 1000 + 50 * train_x, 1000 + 50 * test_x
    top1 = fe.linear_probe_top1(train_x, train_y, test_x, test_y)
    assert top1 >= 0.97
    assert fe.linear_probe_top1(train_x, train_y, test_x, test_y) == top1


def test_linear_probe_standardises_features():
    # The label is in a feature a million times smaller than five noise features:
    # only after standardisation can a weight-decayed probe use it.
    g = torch.Generator().manual_seed(8)

    def make(n):
        y = torch.randint(0, 2, (n,), generator=g)
        signal = (2 * y - 1).float() + 0.3 * torch.randn(n, generator=g)
        return torch.cat([1e-3 * signal[:, None], 1e3 * torch.randn(n, 5, generator=g)], dim=1), y

    assert fe.linear_probe_top1(*make(300), *make(200)) >= 0.97


def test_linear_probe_random_labels_near_chance():
    g = torch.Generator().manual_seed(7)
    train_x, test_x = torch.randn(600, 16, generator=g), torch.randn(600, 16, generator=g)
    train_y, test_y = torch.randint(0, 10, (600,), generator=g), torch.randint(0, 10, (600,), generator=g)
    assert 0.04 < fe.linear_probe_top1(train_x, train_y, test_x, test_y) < 0.18


def test_linear_probe_bad_inputs():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="empty"):
        fe.linear_probe_top1(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match="non-negative integers"):
        fe.linear_probe_top1(x, y.float(), x, y)
    with pytest.raises(ValueError, match="epochs"):
        fe.linear_probe_top1(x, y, x, y, epochs=0)


# ------------------------------------------------------------------------ features


def test_extract_features_is_mean_of_tokens(small_vit):
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    small_vit.train()  # extract_features evaluates in eval mode and restores the flag
    features = fe.extract_features(small_vit, images, batch_size=2)
    assert small_vit.training
    small_vit.eval()
    with torch.no_grad():
        tokens = small_vit(normalize(images))
    assert tokens.shape == (5, 4 * 4, 192)
    assert features.shape == (5, 192) and features.dtype == torch.float32 and features.device.type == "cpu"
    torch.testing.assert_close(features, tokens.mean(dim=1), rtol=1e-5, atol=1e-5)
    assert not features.requires_grad


def test_extract_features_rejects_float_images(small_vit):
    with pytest.raises(ValueError, match="uint8"):
        fe.extract_features(small_vit, torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="batch_size"):
        fe.extract_features(small_vit, torch.zeros(2, 3, 32, 32, dtype=torch.uint8), batch_size=0)


# ------------------------------------------------------------------- checkpoints


def test_encoder_from_checkpoint_round_trip(checkpoint_path, trained_models):
    encoder, _, target = trained_models
    loaded = fe.encoder_from_checkpoint(checkpoint_path)
    assert_same_weights(loaded, target)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.patch_embed.img_size == 32 and loaded.patch_embed.patch_size == 8
    assert_same_weights(fe.encoder_from_checkpoint(checkpoint_path, which="encoder"), encoder)


def test_reference_checkpoint_needs_shape_arguments(reference_checkpoint_path, trained_models):
    with pytest.raises(ValueError, match="no fastjepa config") as info:
        fe.encoder_from_checkpoint(reference_checkpoint_path)
    assert "model_name=" in str(info.value) and "patch_size=" in str(info.value) and "crop_size=" in str(info.value)
    with pytest.raises(ValueError, match=r"pass crop_size=\.\.\.") as info:
        fe.encoder_from_checkpoint(reference_checkpoint_path, model_name="vit_tiny", patch_size=8)
    assert "pass model_name" not in str(info.value)
    loaded = fe.encoder_from_checkpoint(reference_checkpoint_path, model_name="vit_tiny", patch_size=8, crop_size=32)
    assert_same_weights(loaded, trained_models[2])


def test_encoder_from_checkpoint_failures(checkpoint_path, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        fe.encoder_from_checkpoint(tmp_path / "nothing.pth.tar")
    with pytest.raises(ValueError, match="which must be one of target_encoder, encoder; got 'predictor'"):
        fe.encoder_from_checkpoint(checkpoint_path, which="predictor")
    with pytest.raises(ValueError, match="unknown model_name 'vit_mini'"):
        fe.encoder_from_checkpoint(checkpoint_path, model_name="vit_mini")
    # Arguments override the config: a crop size or model that does not fit the weights.
    with pytest.raises(CheckpointError, match=r"'target_encoder' does not fit .*crop_size=16") as info:
        fe.encoder_from_checkpoint(checkpoint_path, crop_size=16)
    assert "pos_embed" in str(info.value)
    with pytest.raises(CheckpointError, match="'encoder' does not fit .*model_name='vit_small'"):
        fe.encoder_from_checkpoint(checkpoint_path, which="encoder", model_name="vit_small")


def test_encoder_from_checkpoint_missing_entry(tmp_path, trained_models):
    path = tmp_path / "no-target.pth.tar"
    save_checkpoint({"encoder": trained_models[0].state_dict(), "epoch": 0, "fastjepa": {"config": CONFIG}}, path)
    with pytest.raises(CheckpointError, match="lacks 'target_encoder'; it has encoder, epoch, fastjepa"):
        fe.encoder_from_checkpoint(path)
    assert_same_weights(fe.encoder_from_checkpoint(path, which="encoder"), trained_models[0])


# ------------------------------------------------------------------------ evaluate


def test_evaluate_knn_on_digits_with_a_random_vit(small_vit):
    result = fe.evaluate("knn", encoder=small_vit, dataset="digits")
    assert result["method"] == "knn" and result["dataset"] == "digits"
    assert (result["train"], result["test"]) == (1258, 539)
    assert 0.2 < result["top1"] <= 1.0  # chance is 0.1


def test_evaluate_linear_from_checkpoint(reference_checkpoint_path):
    result = fe.evaluate(
        "linear", checkpoint=reference_checkpoint_path, image_size=16, model_name="vit_tiny", patch_size=8, crop_size=32
    )
    assert result["method"] == "linear" and result["test"] == 539
    assert result["top1"] > 0.5


def write_digit_folders(root, classes_per_split):
    """root/<split>/<digit>/*.png from the 8x8 digits (grey, upsampled 4x)."""
    train_x, train_y, test_x, test_y = fe.load_digits(image_size=32)
    sources = {"train": (train_x, train_y, 15), "val": (test_x, test_y, 5)}
    for split, digits in classes_per_split.items():
        images, labels, count = sources[split]
        for d in digits:
            folder = root / split / f"digit{d}"
            folder.mkdir(parents=True)
            for i, image in enumerate(images[labels == d][:count]):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


def test_evaluate_image_folders(tmp_path, small_vit):
    write_digit_folders(tmp_path, {"train": [0, 1, 4, 7], "val": [1, 7]})  # val lacks two classes: labels follow names
    result = fe.evaluate("knn", encoder=small_vit, data=tmp_path, k=5, num_workers=0)
    assert (result["train"], result["test"], result["dataset"]) == (60, 10, str(tmp_path))
    assert result["top1"] >= 0.6  # chance is 0.25


def test_evaluate_image_folder_problems(tmp_path, small_vit):
    with pytest.raises(FileNotFoundError, match="lacks train/ and val/"):
        fe.evaluate("knn", encoder=small_vit, data=tmp_path)
    write_digit_folders(tmp_path, {"train": [0, 1], "val": [1, 2]})
    with pytest.raises(ValueError, match="classes the train split lacks: digit2"):
        fe.evaluate("knn", encoder=small_vit, data=tmp_path, num_workers=0)


def test_evaluate_bad_arguments(small_vit, checkpoint_path):
    with pytest.raises(ValueError, match="method must be one of knn, linear"):
        fe.evaluate("svm", encoder=small_vit)
    with pytest.raises(ValueError, match="exactly one of"):
        fe.evaluate("knn")
    with pytest.raises(ValueError, match="exactly one of"):
        fe.evaluate("knn", encoder=small_vit, checkpoint=checkpoint_path)
    with pytest.raises(ValueError, match="dataset must be one of digits"):
        fe.evaluate("knn", encoder=small_vit, dataset="imagenet")
    with pytest.raises(ValueError, match="only apply with checkpoint"):
        fe.evaluate("knn", encoder=small_vit, model_name="vit_tiny")
    with pytest.raises(TypeError, match="unexpected keyword arguments depth"):
        fe.evaluate("knn", encoder=small_vit, depth=2)
