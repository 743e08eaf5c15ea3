"""Low-shot subsets and the held-out split: class balance, exact counts, determinism, the
reference's subset list format, and named errors."""

import pytest
import torch

from fastjepa.eval.subsets import class_balanced_subset, holdout_split, subset_from_file

LABELS = torch.tensor([0] * 7 + [1] * 12 + [2] * 5 + [3] * 30)


def test_per_class_takes_exactly_n_of_every_class_the_same_ones_every_time():
    first = class_balanced_subset(LABELS, per_class=5, seed=3)
    assert len(first) == 20 and torch.equal(LABELS[first].bincount(), torch.tensor([5, 5, 5, 5]))
    assert torch.equal(first, class_balanced_subset(LABELS, per_class=5, seed=3))
    assert torch.equal(first, first.sort().values) and len(first.unique()) == 20
    assert not torch.equal(first, class_balanced_subset(LABELS, per_class=5, seed=4))


def test_fraction_rounds_per_class_and_keeps_at_least_one():
    chosen = class_balanced_subset(LABELS, fraction=0.1, seed=0)
    assert LABELS[chosen].bincount().tolist() == [1, 1, 1, 3]  # round(0.7) = 1, round(1.2) = 1, round(0.5) -> at least 1, 3
    assert len(class_balanced_subset(LABELS, fraction=1.0)) == len(LABELS)


def test_a_class_too_small_for_per_class_is_named():
    with pytest.raises(ValueError, match="class 'bird' has 5 training images, fewer than --per-class 6"):
        class_balanced_subset(LABELS, per_class=6, classes=["cat", "dog", "bird", "fish"])
    for kwargs, message in [({}, "exactly one"), ({"per_class": 2, "fraction": 0.5}, "exactly one"), ({"per_class": 0}, "per_class"),
                            ({"fraction": 0.0}, "fraction"), ({"fraction": 1.5}, "fraction")]:
        with pytest.raises(ValueError, match=message):
            class_balanced_subset(LABELS, **kwargs)


def test_subset_file_in_the_reference_format(tmp_path):
    ids = ["/data/train/n01/n01_10.JPEG", "/data/train/n01/n01_11.JPEG", "/data/train/n02/n02_7.JPEG", "/data/train/n02/n02_8.JPEG"]
    listing = tmp_path / "1percent.txt"
    listing.write_text("n02_8.JPEG\nn01_10.JPEG\n\n")
    assert subset_from_file(ids, listing).tolist() == [0, 3]
    listing.write_text("n01_10.JPEG\nn03_1.JPEG\nn03_2.JPEG\n")
    with pytest.raises(ValueError, match="names 2 images the train split lacks, e.g. n03_1.JPEG, n03_2.JPEG"):
        subset_from_file(ids, listing)
    with pytest.raises(OSError, match="cannot read subset file"):
        subset_from_file(ids, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="names no image"):
        subset_from_file(ids, tmp_path / "empty.txt")


def test_holdout_split_partitions_train_and_holds_out_every_class_it_can():
    fit, heldout = holdout_split(LABELS, fraction=0.2, seed=0)
    assert sorted(fit.tolist() + heldout.tolist()) == list(range(len(LABELS)))
    assert LABELS[heldout].bincount().tolist() == [1, 2, 1, 6]
    assert torch.equal(heldout, holdout_split(LABELS, fraction=0.2, seed=0)[1])
    assert not torch.equal(heldout, holdout_split(LABELS, fraction=0.2, seed=1)[1])
    single = torch.tensor([0, 1, 1, 2])  # classes 0 and 2 have one image: they stay in fit
    fit, heldout = holdout_split(single, fraction=0.5)
    assert single[heldout].tolist() == [1] and sorted(single[fit].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="nothing can be held out"):
        holdout_split(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="holdout fraction"):
        holdout_split(LABELS, fraction=1.0)
