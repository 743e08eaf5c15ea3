"""One evaluation run end to end, in Python and through ``fastjepa eval``: the probes on the
digits features of a checkpoint (logreg against scikit-learn, the linear grid against logreg),
low-shot subsets, the generated count and distance sets, the results file, the feature cache,
the plot, and every bad input refused with one line."""

import json

import pytest
import torch
from conftest import tiny_jepa_models
from PIL import Image

pytest.importorskip("sklearn")

from fastjepa.cli import main as cli  # noqa: E402
from fastjepa.eval import features as ft  # noqa: E402
from fastjepa.eval.datasets import load_splits  # noqa: E402
from fastjepa.eval.logreg import sklearn_logreg_top1  # noqa: E402
from fastjepa.eval.runner import evaluate, load_frozen_encoder, train_subset  # noqa: E402
from fastjepa.helper import save_checkpoint  # noqa: E402

CONFIG = {"data": {"crop_size": 32}, "logging": {}, "mask": {"patch_size": 8}, "meta": {"model_name": "vit_tiny"}, "optimization": {}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A ViT-tiny/8 checkpoint at 32 px in fastjepa's format, its target a little off the context encoder."""
    encoder, predictor, target = tiny_jepa_models()
    path = tmp_path_factory.mktemp("ckpt") / "jepa-latest.pth.tar"
    prefixed = {name: {f"module.{k}": v for k, v in model.state_dict().items()} for name, model in
                (("encoder", encoder), ("predictor", predictor), ("target_encoder", target))}
    save_checkpoint({**prefixed, "opt": {}, "epoch": 1, "fastjepa": {"config": CONFIG}}, path)
    return path


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return load_frozen_encoder(checkpoint)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


def test_logreg_matches_scikit_learn_and_the_linear_grid_matches_logreg(encoder, cache):
    logreg, context = evaluate("logreg", encoder, "digits", cache=cache, progress=False)
    train, val = load_splits("digits", 32)
    train_features = ft.features(encoder, train, ("last",), 32, cache=cache, progress=False)["last"]
    val_features = ft.features(encoder, val, ("last",), 32, cache=cache, progress=False)["last"]
    reference = sklearn_logreg_top1(train_features, train.labels, val_features, val.labels)
    assert abs(logreg.top1 - reference) <= 0.01, (logreg.top1, reference)
    assert (logreg.n_train, logreg.n_val, logreg.classes) == (1258, 539, 10) and context["subset"] == "all"
    # the default schedule (2,500 steps here) on the top of the grid, bn heads without weight decay: 6 of the 104 heads,
    # to stay quick (the whole grid's run is benchmarks/results/eval-2026-12-06/digits/linear.json)
    linear, _ = evaluate("linear", encoder, "digits", cache=cache, progress=False, heads=("bn",), weight_decays=(0.0,), lrs=(0.02, 0.05, 0.1))
    assert linear.top1 >= logreg.top1 - 0.01, (linear.top1, logreg.top1)
    assert len(linear.heads) == 3 * 2 and {h["features"] for h in linear.heads} == {"last", "last4"}
    assert linear.chosen["heldout_top1"] == max(h["heldout_top1"] for h in linear.heads) and linear.protocol["epochs"] == 500


def test_per_class_trains_on_exactly_that_many_images_the_same_ones_every_run(encoder, cache):
    train, _ = load_splits("digits", 32)
    first, context = train_subset(train, per_class=5, seed=0)
    again, _ = train_subset(train, per_class=5, seed=0)
    assert len(first) == 50 and first.ids == again.ids and torch.equal(first.labels.bincount(), torch.full((10,), 5))
    assert context == {"subset": {"per_class": 5}, "subset_seed": 0}
    result, _ = evaluate("linear", encoder, "digits", per_class=5, cache=cache, progress=False, epochs=20, lrs=(1e-2, 1e-1), heads=("linear",))
    assert result.n_train == 50 and 0.1 < result.top1 <= 1.0
    result, _ = evaluate("logreg", encoder, "digits", fraction=0.1, cache=cache, progress=False)
    assert result.n_train == sum(max(1, round(0.1 * count)) for count in train.labels.bincount().tolist())


@pytest.mark.parametrize("data", ["shapes-count", "shapes-dist"])
def test_the_count_and_distance_sets_run_end_to_end(encoder, cache, data):
    result, context = evaluate("linear", encoder, data, cache=cache, progress=False, epochs=5, lrs=(1e-2,), heads=("bn",))
    assert result.n_train == 1600 and result.n_val == 400 and context["data"] == data
    chance = 1 / result.classes
    assert chance < result.top1 <= 1.0
    knn, _ = evaluate("knn", encoder, data, cache=cache, progress=False)
    assert knn.n_val == 400 and [h["k"] for h in knn.heads] == [10, 20, 100, 200]


def test_attentive_probe_on_digit_tokens(encoder, cache):
    result, _ = evaluate("attentive", encoder, "digits", per_class=20, cache=cache, progress=False, epochs=3)
    assert result.n_train == 200 and result.method == "attentive" and 0.1 < result.top1 <= 1.0
    assert result.protocol["layers"] == ["tokens"]


def test_the_command_writes_results_caches_features_and_plots(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert cli(["eval", "knn", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "knn.json").read_text())
    assert record["method"] == "knn" and record["weights"] == str(checkpoint) and record["encoder"] == "target"
    assert record["command"] == f"fastjepa eval knn --checkpoint {checkpoint} --out {out} --no-progress"
    assert {"top1", "chosen", "heads", "n_train", "n_val", "classes", "protocol", "date", "weights_sha256"} <= set(record)
    assert len(list((out / "features").glob("*.safetensors"))) == 2  # train and val
    printed = capsys.readouterr().out
    assert "knn top-1:" in printed and "chosen on held-out train" in printed
    monkeypatch.setattr(ft, "extract", lambda *a, **k: pytest.fail("encoded again instead of reading the cache"))
    assert cli(["eval", "logreg", "--weights", str(checkpoint), "--out", str(out), "--no-progress"]) == 0
    assert (out / "logreg.json").exists()
    assert cli(["plot", str(out)]) == 0
    assert (out / "knn.png").stat().st_size > 5000 and (out / "logreg.png").exists()


def write_folders(root, train_classes, val_classes, per_class=3):
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (60 * c, 20 * i, 100)).save(root / split / name / f"{name}_{i}.png")


def test_bad_inputs_are_refused_with_one_line(checkpoint, tmp_path, capsys):
    def refused(*args):
        assert cli(["eval", *args, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    write_folders(tmp_path / "unknown", ["ant", "bee"], ["ant", "wasp"])
    assert "classes the train split lacks: wasp" in refused("knn", "--data", str(tmp_path / "unknown"))
    assert "class '0' has 125 training images, fewer than --per-class 200" in refused("knn", "--per-class", "200")
    listing = tmp_path / "subset.txt"
    listing.write_text("0_00000.png\nn0_missing.JPEG\n")
    assert "names 1 images the train split lacks, e.g. n0_missing.JPEG" in refused("logreg", "--subset", str(listing))
    assert "trained at 32 px; --image-size 64" in refused("knn", "--image-size", "64")
    assert "fastjepa eval" in refused("knn", "--data", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as usage:  # argparse: one usage line and the error, exit 2
        cli(["eval", "knn", "--checkpoint", str(checkpoint), "--per-class", "5", "--fraction", "0.5"])
    assert usage.value.code == 2 and "not allowed with argument --per-class" in capsys.readouterr().err
    write_folders(tmp_path / "lowshot", ["ant", "bee"], ["ant", "bee"], per_class=3)
    ants = tmp_path / "ants.txt"
    ants.write_text("ant_0.png\nant_1.png\n")
    assert "the chosen training images lack val classes bee" in refused("logreg", "--data", str(tmp_path / "lowshot"), "--subset", str(ants))
