"""The probes' data: scikit-learn's digits, the generated count and distance scenes, image
folders (val labelled by train's class names), and Split.take."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")

from fastjepa.eval.datasets import load_digits, load_splits  # noqa: E402


@pytest.fixture(scope="module")
def digits16():
    return load_digits(image_size=16)


def test_load_digits_shapes_dtypes_and_values(digits16):
    train_x, train_y, test_x, test_y = digits16
    assert len(train_x) + len(test_x) == 1797
    assert train_x.shape[1:] == test_x.shape[1:] == (3, 16, 16)
    assert train_x.dtype == test_x.dtype == torch.uint8
    assert train_y.dtype == test_y.dtype == torch.int64
    assert torch.equal(train_x[:, 0], train_x[:, 1]) and torch.equal(train_x[:, 0], train_x[:, 2])
    assert int(train_x.max()) == 255 and int(train_x.min()) == 0
    assert set(train_y.tolist()) == set(test_y.tolist()) == set(range(10))


def test_load_digits_native_size_scales_grey_levels():
    from sklearn.datasets import load_digits as sklearn_digits

    train_x, _, test_x, _ = load_digits(image_size=8)
    raw = np.round(sklearn_digits().images * 255 / 16)
    ours = np.sort(torch.cat([train_x, test_x])[:, 0].numpy().reshape(1797, -1), axis=0)
    assert np.array_equal(ours, np.sort(raw.reshape(1797, -1), axis=0))


def test_load_digits_split_is_stratified_and_deterministic(digits16):
    _, train_y, test_x, test_y = digits16
    everything = torch.cat([train_y, test_y])
    for c in range(10):
        assert int((test_y == c).sum()) == round(0.3 * int((everything == c).sum()))
    assert all(torch.equal(a, b) for a, b in zip(digits16, load_digits(image_size=16)))
    assert not torch.equal(load_digits(image_size=16, seed=1)[2], test_x)


def test_load_digits_bad_arguments_and_missing_sklearn(monkeypatch):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)
    with pytest.raises(ValueError, match="image_size"):
        load_digits(image_size=0)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'fastjepa\[eval\]'"):
        load_digits()


def test_digits_splits_name_every_image_and_take_keeps_classes():
    train, val = load_splits("digits", 16)
    assert (len(train), len(val)) == (1258, 539) and train.classes == [str(d) for d in range(10)]
    assert train.ids[0] == f"{train.labels[0].item()}_00000.png" and len(set(train.ids)) == len(train)
    part = train.take(torch.tensor([5, 2, 9]))
    assert part.labels.tolist() == train.labels[[5, 2, 9]].tolist() and part.ids == [train.ids[i] for i in (5, 2, 9)]
    assert torch.equal(part.images, train.images[[5, 2, 9]]) and part.classes == train.classes


def test_generated_shape_sets_load_as_splits():
    for data, classes in (("shapes-count", 8), ("shapes-dist", None)):
        train, val = load_splits(data, 32)
        assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
        assert train.classes == val.classes and (classes is None or len(train.classes) == classes)
        assert set(val.labels.tolist()) == set(range(len(train.classes)))


def write_folder(root, split, classes, per_class=3):
    for c, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20, 16), (40 * c, 10 * i, 90)).save(folder / f"{name}_{i}.png")


def test_folder_val_is_labelled_by_the_train_class_names(tmp_path):
    write_folder(tmp_path, "train", ["ant", "bee", "cat"])
    write_folder(tmp_path, "val", ["bee", "cat"], per_class=2)
    train, val = load_splits(str(tmp_path), 16)
    assert train.classes == val.classes == ["ant", "bee", "cat"]
    assert val.labels.tolist() == [1, 1, 2, 2] and val.ids[0].endswith("bee_0.png")
    assert len(val.take(torch.tensor([3])).listing) == 1


def test_folder_problems_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks train/ and val/"):
        load_splits(str(tmp_path), 16)
    with pytest.raises(FileNotFoundError, match="neither digits, shapes-count, shapes-dist nor a folder"):
        load_splits(str(tmp_path / "nope"), 16)
    write_folder(tmp_path, "train", ["ant"])
    write_folder(tmp_path, "val", ["ant", "wasp"])
    with pytest.raises(ValueError, match="classes the train split lacks: wasp"):
        load_splits(str(tmp_path), 16)
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "val").mkdir()
    Image.new("RGB", (8, 8)).save(flat / "train" / "a.png")
    with pytest.raises(ValueError, match="no class folders"):
        load_splits(str(flat), 16)
