"""Frozen features: each set against a computation written out here, batching, in-memory and
folder images, augmentation draws, the safetensors cache and its key, two gloo processes, bad input."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from fastjepa.data.images import make_eval_transform
from fastjepa.data.normalize import normalize
from fastjepa.eval import features as ft
from fastjepa.eval.datasets import Split, load_splits
from fastjepa.models.vision_transformer import vit_tiny


def small_vit(depth=4, seed=0):
    torch.manual_seed(seed)
    return vit_tiny(img_size=[32], patch_size=8, depth=depth).eval().requires_grad_(False)


def random_split(n=7, seed=0):
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(n) % 2
    return Split("random", labels, ["a", "b"], [f"x_{i}.png" for i in range(n)], images=images)


def written_out(encoder, images):
    """The three sets computed step by step: blocks run one by one, the last four normalised."""
    with torch.no_grad():
        x = encoder.patch_embed(normalize(images))
        x = x + encoder.pos_embed
        outputs = []
        for block in encoder.blocks:
            x = block(x)
            outputs.append(x)
        tokens = encoder.norm(x)
        return {"last": tokens.mean(1), "last4": torch.cat([encoder.norm(o).mean(1) for o in outputs[-4:]], 1), "tokens": tokens}


def test_each_feature_set_matches_the_written_out_computation_at_any_batch_size():
    encoder, split = small_vit(), random_split()
    expected = written_out(encoder, split.images)
    for batch_size in (2, 256):
        got = ft.features(encoder, split, ("last", "last4", "tokens"), 32, batch_size=batch_size, progress=False)
        assert set(got) == {"last", "last4", "tokens"}
        assert got["last"].shape == (7, 192) and got["last4"].shape == (7, 4 * 192) and got["tokens"].shape == (7, 16, 192)
        for name in got:
            assert got[name].dtype == torch.float32 and not got[name].requires_grad
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_folder_images_go_through_the_eval_transform(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(2):
            for split in ("train", "val"):
                Image.new("RGB", (50 + 7 * i, 40), (60 * i, 100 if c == "a" else 200, 30)).save(tmp_path / split / c / f"{c}{i}.png")
    train, _ = load_splits(str(tmp_path), 32)
    encoder = small_vit()
    got = ft.features(encoder, train, ("last",), 32, progress=False)["last"]
    transform = make_eval_transform(32)
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path in train.ids])
    torch.testing.assert_close(got, written_out(encoder, images)["last"], rtol=1e-5, atol=1e-5)


def test_augmented_features_are_drawn_per_epoch_and_repeat_for_a_seed():
    encoder, split = small_vit(), random_split()
    plain = ft.features(encoder, split, ("last",), 32, progress=False)["last"]
    first = ft.features(encoder, split, ("last",), 32, augmentation="rrc-flip", seed=1, epoch=0, progress=False)["last"]
    again = ft.features(encoder, split, ("last",), 32, augmentation="rrc-flip", seed=1, epoch=0, progress=False)["last"]
    later = ft.features(encoder, split, ("last",), 32, augmentation="rrc-flip", seed=1, epoch=1, progress=False)["last"]
    assert torch.equal(first, again) and not torch.allclose(first, later) and not torch.allclose(first, plain)
    transform = make_eval_transform(32)  # resize to 37 px, centre crop 32
    cropped = torch.stack([transform(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in split.images])
    unflipped, flipped = written_out(encoder, cropped)["last"], written_out(encoder, cropped.flip(-1))["last"]
    centre = ft.features(encoder, split, ("last",), 32, augmentation="center-flip", epoch=3, progress=False)["last"]
    sides = [torch.allclose(c, b, atol=1e-4) for c, b in zip(centre, flipped)]
    assert all(s or torch.allclose(c, a, atol=1e-4) for s, c, a in zip(sides, centre, unflipped)) and 0 < sum(sides) < len(sides)


def test_the_cache_is_read_back_and_keyed_by_weights_images_and_layers(tmp_path, monkeypatch):
    encoder, split = small_vit(), random_split()
    first = ft.features(encoder, split, ("last",), 32, cache=tmp_path, progress=False)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(ft, "extract", lambda *a, **k: pytest.fail("encoded again instead of reading the cache"))
    assert torch.equal(ft.features(encoder, split, ("last",), 32, cache=tmp_path, progress=False)["last"], first["last"])
    monkeypatch.undo()
    ft.features(small_vit(seed=1), split, ("last",), 32, cache=tmp_path, progress=False)  # other weights
    ft.features(encoder, random_split(seed=1), ("last",), 32, cache=tmp_path, progress=False)  # other images
    ft.features(encoder, split, ("last", "tokens"), 32, cache=tmp_path, progress=False)  # other layers
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    ft.features(encoder, split, ("last",), 32, cache=tmp_path, augmentation="rrc-flip", progress=False)  # augmented: never cached
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


def test_an_unreadable_image_is_named(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / split / "a" / "good.png")
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    train, _ = load_splits(str(tmp_path), 32)
    with pytest.raises(OSError, match="cannot read image .*broken.png"):
        ft.features(small_vit(), train, ("last",), 32, progress=False)


def test_bad_arguments():
    encoder, split = small_vit(), random_split()
    for kwargs, message in [({"layers": ("cls",)}, "layers must be some of"), ({"layers": ()}, "layers must be some of"),
                            ({"augmentation": "mixup"}, "augmentation must be one of"), ({"image_size": 64}, "trained at 32 px")]:
        args = {"layers": ("last",), "image_size": 32, **kwargs}
        with pytest.raises(ValueError, match=message):
            ft.features(encoder, split, args.pop("layers"), args.pop("image_size"), progress=False, **args)
    with pytest.raises(ValueError, match="at least 4 blocks"):
        ft.features(small_vit(depth=2), split, ("last4",), 32, progress=False)


def _two_ranks(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", world_size=2, rank=rank)
    try:
        rows = ft.features(small_vit(), random_split(n=7), ("last", "tokens"), 32, batch_size=2, progress=False)
        torch.save(rows, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_encode_half_each_and_both_hold_the_whole_set(tmp_path):
    mp.spawn(_two_ranks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    alone = ft.features(small_vit(), random_split(n=7), ("last", "tokens"), 32, progress=False)
    for rank in range(2):
        rows = torch.load(tmp_path / f"rank{rank}.pt")
        for name in alone:
            torch.testing.assert_close(rows[name], alone[name], rtol=1e-5, atol=1e-5)
