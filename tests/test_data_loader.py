"""The loader interface every data backend implements (pil, dali, torchvision), on the CPU:
batches of normalised images with their masks, sharding, determinism, mid-epoch resume,
bad files; the backend choice and the masks drawn one step ahead."""

import io

import numpy as np
import pytest
import torch
from conftest import run_as_ranks
from imagefiles import colour, identify, write_bad_files, write_colour_images, write_every_mode
from PIL import Image

import fastjepa.data.loader as loader_module
from fastjepa.config import ConfigError, build_loader, mask_sampler, validate
from fastjepa.data.base import MaskStream
from fastjepa.data.images import mix_seed
from fastjepa.data.loader import backend_problem, resolve_backend

CPU = torch.device("cpu")


def data_config(root, backend, **data):
    return validate({
        "data": {"backend": backend, "batch_size": 4, "crop_size": 48, "num_workers": 0, "pin_mem": False, "repeat": 1,
                 "root_path": str(root), "image_folder": "", **data},
        "mask": {"patch_size": 8, "min_keep": 1},
    })


def fake_decode_jpegs(encoded, device):
    """torchvision.io.decode_jpeg's contract, with PIL: one failing file fails the call."""
    images = []
    for data in encoded:
        try:
            image = Image.open(io.BytesIO(data.numpy().tobytes()))
            image.load()
        except Exception as error:
            raise RuntimeError(f"fake decode_jpeg: {error}") from error
        images.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous().to(device))
    return images


@pytest.fixture(params=["pil", "dali", "torchvision"])
def backend(request, monkeypatch):
    """Each backend; torchvision's decoder is replaced by a PIL stand-in when torchvision is not installed."""
    name = request.param
    if name == "dali" and backend_problem("dali", CPU):
        pytest.skip(f"dali backend: {backend_problem('dali', CPU)}")
    if name == "torchvision" and backend_problem("torchvision", CPU):
        import fastjepa.data.torchvision_gpu as torchvision_gpu

        real = loader_module.backend_problem
        monkeypatch.setattr(loader_module, "backend_problem", lambda n, d: None if n == "torchvision" else real(n, d))
        monkeypatch.setattr(torchvision_gpu, "decode_jpegs", fake_decode_jpegs)
    return name


def epoch(loader, e, start_itr=0, first_step=None):
    first_step = e * loader.steps_per_epoch + start_itr if first_step is None else first_step
    return list(loader.epoch(e, start_itr, first_step))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and x.bad == y.bad
        assert all(torch.equal(m, n) for m, n in zip(x.masks_enc + x.masks_pred, y.masks_enc + y.masks_pred))


def test_an_epoch_is_normalised_images_with_their_step_masks(tmp_path, backend):
    write_colour_images(tmp_path, 12)
    config = data_config(tmp_path, backend)
    loader = build_loader(config, CPU, seed=3, root=str(tmp_path))
    assert loader.backend == backend and loader.num_images == 12 and loader.steps_per_epoch == 3
    batches = epoch(loader, 1, first_step=7)
    assert len(batches) == 3
    seen = []
    for step, batch in enumerate(batches, start=7):
        assert batch.images.shape == (4, 3, 48, 48) and batch.images.dtype == torch.float32 and batch.bad == 0
        seen += identify(batch.images)
        expected = mask_sampler(config).sample(4, generator=torch.Generator().manual_seed(mix_seed(3, 0, step)))
        assert all(torch.equal(m, n) for m, n in zip(batch.masks_enc + batch.masks_pred, expected[0] + expected[1]))
    assert sorted(seen) == list(range(12))  # every image once, each decoded to its own colour
    for i, image in zip(identify(batches[0].images), batches[0].images):
        pixels = (image * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) * 255
        assert (pixels - torch.tensor(colour(i), dtype=torch.float32).view(3, 1, 1)).abs().max() < 4  # colours, RGB order


def test_same_seed_same_batches_other_seed_or_epoch_differ(tmp_path, backend):
    write_colour_images(tmp_path, 12)
    config = data_config(tmp_path, backend, use_horizontal_flip=True)
    first = epoch(build_loader(config, CPU, seed=5, root=str(tmp_path)), 0)
    assert_same_batches(first, epoch(build_loader(config, CPU, seed=5, root=str(tmp_path)), 0))
    order = [identify(b.images) for b in first]
    assert order != [identify(b.images) for b in epoch(build_loader(config, CPU, seed=6, root=str(tmp_path)), 0)]
    assert order != [identify(b.images) for b in epoch(build_loader(config, CPU, seed=5, root=str(tmp_path)), 1)]


def test_worker_processes_or_threads_do_not_change_the_batches(tmp_path, backend):
    """num_workers: DataLoader processes (pil, torchvision) or DALI threads; the mask thread must
    not exist when the DataLoader forks its workers (a fork beside a busy thread can deadlock)."""
    write_colour_images(tmp_path, 12)
    alone = build_loader(data_config(tmp_path, backend, use_horizontal_flip=True), CPU, seed=0, root=str(tmp_path))
    helped = build_loader(data_config(tmp_path, backend, use_horizontal_flip=True, num_workers=2), CPU, seed=0, root=str(tmp_path))
    for e in range(2):
        assert_same_batches(epoch(alone, e), epoch(helped, e))


def reads(backend, monkeypatch):
    """A list that grows by one for every image file the backend reads."""
    count = []
    if backend == "pil":
        import fastjepa.data.images as images

        real = images.load_rgb
        monkeypatch.setattr(images, "load_rgb", lambda path: count.append(path) or real(path))
    elif backend == "dali":
        from fastjepa.data.dali import DaliLoader

        real = DaliLoader._read
        monkeypatch.setattr(DaliLoader, "_read", lambda self, i: count.append(i) or real(self, i))
    else:
        from fastjepa.data.torchvision_gpu import _Files

        real = _Files.__getitem__
        monkeypatch.setattr(_Files, "__getitem__", lambda self, i: count.append(i) or real(self, i))
    return count


def test_mid_epoch_resume_equals_the_uninterrupted_epoch_and_reads_only_the_rest(tmp_path, backend, monkeypatch):
    write_colour_images(tmp_path, 16)
    config = data_config(tmp_path, backend, use_horizontal_flip=True, repeat=2)  # 8 steps per epoch
    whole = epoch(build_loader(config, CPU, seed=1, root=str(tmp_path)), 2)
    resumed = build_loader(config, CPU, seed=1, root=str(tmp_path))
    count = reads(backend, monkeypatch)
    tail = epoch(resumed, 2, start_itr=5)
    assert len(count) == 3 * 4  # the skipped batches were not read
    assert_same_batches(whole[5:], tail)
    assert epoch(resumed, 2, start_itr=8) == []


def test_two_ranks_read_disjoint_images_in_equal_numbers_of_steps_with_their_own_masks(tmp_path, backend):
    write_colour_images(tmp_path, 11)  # 11 images, 2 ranks, batch 2: 5 images per rank, 2 steps each
    config = data_config(tmp_path, backend, batch_size=2)
    ranks = [build_loader(config, CPU, seed=0, root=str(tmp_path), rank=r, world_size=2) for r in range(2)]
    assert [r.steps_per_epoch for r in ranks] == [2, 2]
    for e in range(3):
        batches = [epoch(r, e, first_step=2 * e) for r in ranks]
        seen = [[i for b in rank_batches for i in identify(b.images)] for rank_batches in batches]
        assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1])
        for a, b in zip(*batches):  # the same step on two ranks: other masks
            assert any(not torch.equal(m, n) for m, n in zip(a.masks_enc + a.masks_pred, b.masks_enc + b.masks_pred))
    with pytest.raises(ConfigError, match="larger than the 1 images of an epoch on each of 8 ranks in "):
        build_loader(data_config(tmp_path, backend, batch_size=2), CPU, seed=0, root=str(tmp_path), rank=0, world_size=8)


def test_bad_files_are_skipped_and_counted_never_fatal(tmp_path, backend):
    write_colour_images(tmp_path, 7)  # + 5 bad files: whole batches of 2 in every backend
    bad = write_bad_files(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    loader = build_loader(data_config(tmp_path, backend, batch_size=2), CPU, seed=0, root=str(tmp_path))
    assert loader.skipped_files == [str(tmp_path / "notes.txt")]
    for e in range(2):
        batches = epoch(loader, e)
        good = sorted(i for b in batches if len(b.images) for i in identify(b.images))
        skipped = len(loader.rejected) + sum(b.bad for b in batches)
        assert good == list(range(7)) and skipped == len(bad)  # every bad file left out once per epoch
        assert all(b.masks_enc is None and b.images.shape == (0, 3, 48, 48) for b in batches if len(b.images) == 0)
    if backend != "pil":  # the header check found all but the complete, undecodable JPEG
        assert sorted(p for p, _ in loader.rejected) == sorted(p for n, p in bad.items() if n != "undecodable.jpg")


def test_grayscale_cmyk_png_and_16_bit_images_decode_in_every_backend(tmp_path, backend):
    write_every_mode(tmp_path)
    loader = build_loader(data_config(tmp_path, backend, batch_size=3), CPU, seed=0, root=str(tmp_path))
    batches = epoch(loader, 0)
    assert not loader.rejected and sum(b.bad for b in batches) == 0
    assert sum(len(b.images) for b in batches) == 6 and all(torch.isfinite(b.images).all() for b in batches)


def test_an_empty_folder_is_a_clear_error(tmp_path, backend):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty dataset: no images under"):
        build_loader(data_config(tmp_path, backend), CPU, seed=0, root=str(tmp_path))


# ---------------------------------------------------------------------------------- masks


def test_mask_stream_gives_the_trainers_masks_whatever_the_batch_sizes():
    config = data_config("/nonexistent", "pil")
    sampler = mask_sampler(config)

    def direct(step, n, ragged=False):
        return sampler.sample(n, generator=torch.Generator().manual_seed(mix_seed(9, 2, step)), ragged=ragged)

    stream = MaskStream(sampler, seed=9, rank=2, first_step=40, batch_size=4, device=CPU, ragged=False)
    for step, n in zip(range(40, 46), [4, 4, 3, 4, 1, 4]):  # partial batches draw on the spot
        got, expected = stream.take(n), direct(step, n)
        assert all(torch.equal(a, b) for a, b in zip(got[0] + got[1], expected[0] + expected[1]))
    stream.close()
    ragged = MaskStream(sampler, seed=9, rank=2, first_step=3, batch_size=4, device=CPU, ragged=True)
    got, expected = ragged.take(4), direct(3, 4, ragged=True)
    assert torch.equal(got[0][0].index, expected[0][0].index) and got[0][0].lengths == expected[0][0].lengths
    ragged.close()


# ---------------------------------------------------------------------------------- choice


def test_auto_is_pil_on_the_cpu_and_dali_then_torchvision_on_a_gpu(monkeypatch):
    assert resolve_backend("auto", CPU) == "pil"
    gpu = torch.device("cuda")
    monkeypatch.setattr(loader_module, "backend_problem", lambda name, device: None)
    assert resolve_backend("auto", gpu) == "dali"
    monkeypatch.setattr(loader_module, "backend_problem", lambda name, device: "missing" if name == "dali" else None)
    assert resolve_backend("auto", gpu) == "torchvision"
    monkeypatch.setattr(loader_module, "backend_problem", lambda name, device: None if name == "pil" else "missing")
    assert resolve_backend("auto", gpu) == "pil"
    with pytest.raises(ConfigError, match="^data.backend dali: missing$"):
        resolve_backend("dali", CPU)
    assert resolve_backend("pil", gpu) == "pil"


def test_backend_key_is_validated_with_one_line():
    assert validate({})["data"]["backend"] == "auto"
    with pytest.raises(ConfigError, match="^data.backend must be one of auto, dali, torchvision, pil, got 'nvjpeg'$"):
        validate({"data": {"backend": "nvjpeg"}})


def test_missing_backend_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(loader_module, "import_problem", lambda module: "ModuleNotFoundError: no such module")
    with pytest.raises(ConfigError, match=r"data.backend dali: NVIDIA DALI is not importable .*pip install 'fastjepa\[dali\]'"):
        build_loader(data_config(tmp_path, "dali"), CPU, seed=0, root=str(tmp_path))
    with pytest.raises(ConfigError, match="data.backend torchvision: torchvision is not importable"):
        build_loader(data_config(tmp_path, "torchvision"), CPU, seed=0, root=str(tmp_path))


def test_ranks_share_the_header_check_and_read_each_file_once(tmp_path, monkeypatch):
    import fastjepa.data.scan as scan

    write_colour_images(tmp_path, 9)
    (tmp_path / "004.jpg").write_bytes(b"not an image")
    alone = scan.scan_folder(str(tmp_path))
    checked = []
    real = scan.check_file
    monkeypatch.setattr(scan, "check_file", lambda image, formats=None: checked.append(image.name) or real(image, formats))
    results = run_as_ranks(2, lambda r, gather: scan.scan_folder(str(tmp_path), None, r, 2, gather))
    assert sorted(checked) == sorted(alone.images.paths + [str(tmp_path / "004.jpg")])  # each file once, in all
    for result in results:
        assert result.images.paths == alone.images.paths and result.headers == alone.headers
        assert result.rejected == alone.rejected == [(str(tmp_path / "004.jpg"), "not an image (no known image header)")]


def test_colour_and_blur_on_the_device_are_the_batch_op_on_the_same_crops(tmp_path, backend):
    if backend == "pil":
        pytest.skip("pil distorts colours per sample in its workers (tests/test_data_images.py)")
    from fastjepa.data.base import COLOR_STREAM
    from fastjepa.data.color import color_and_blur
    from fastjepa.data.images import mix_seed
    from fastjepa.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize

    write_colour_images(tmp_path, 8)
    augment = dict(use_color_distortion=True, color_jitter_strength=1.0, use_gaussian_blur=True)
    plain = epoch(build_loader(data_config(tmp_path, backend), CPU, seed=3, root=str(tmp_path)), 1)
    coloured = epoch(build_loader(data_config(tmp_path, backend, **augment), CPU, seed=3, root=str(tmp_path)), 1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))
    changed = 0
    for itr, (a, b) in enumerate(zip(plain, coloured)):
        crops = (a.images * std + mean).round().to(torch.uint8)  # the uint8 crops back
        g = torch.Generator().manual_seed(mix_seed(3, 1, 0, itr, COLOR_STREAM))
        expected = normalize(color_and_blur(crops, g, True, 1.0, True))
        assert torch.allclose(b.images, expected, atol=1e-5)
        changed += int((b.images - a.images).abs().amax(dim=(1, 2, 3)).gt(0.01).sum())
    assert changed >= 4  # most of the 8 images were distorted (jitter p = 0.8, grayscale 0.2, blur 0.5)


def test_labelled_epoch_gives_uint8_crops_with_their_labels_over_a_listing(tmp_path, backend):
    """Fine-tuning's view: class folders, a listing of part of them (a low-shot subset) with a
    bad file inside, no mask sampler; the crops are the pretraining batch before its
    normalisation, and each label is its image's class."""
    from fastjepa.data.images import list_images
    from fastjepa.data.loader import make_loader
    from fastjepa.data.normalize import normalize

    for c, name in enumerate(("apple", "berry", "cherry")):
        for i in range(4):
            k = 4 * c + i
            (tmp_path / name).mkdir(exist_ok=True)
            Image.new("RGB", (40 + k, 30 + k), colour(k)).save(tmp_path / name / f"{k:02d}.jpg", quality=95)
    (tmp_path / "berry" / "99.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    listing = list_images(str(tmp_path))
    assert listing.classes == ["apple", "berry", "cherry"]
    keep = [i for i, path in enumerate(listing.paths) if not path.endswith(("00.jpg", "05.jpg"))]  # a subset: 2 images left out
    subset = listing.take(keep)
    config = data_config(tmp_path, backend, batch_size=3, use_horizontal_flip=True)
    from fastjepa.config import loader_settings

    labelled = make_loader(loader_settings(config), None, CPU, 4, str(tmp_path), listing=subset)
    pretraining = make_loader(loader_settings(config), mask_sampler(config), CPU, 4, str(tmp_path), listing=subset)
    assert labelled.num_images == len(subset) - (backend != "pil")  # the header check leaves the bad file out before training
    seen = []
    for (images, labels, bad), batch in zip(labelled.labelled_epoch(1, 0), pretraining.epoch(1, 0, 0)):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 48, 48) and labels.dtype == torch.int64
        assert len(images) == len(labels) == 3 - bad and bad == batch.bad
        assert torch.equal(normalize(images), batch.images)
        for k, label in zip(identify(normalize(images)), labels.tolist()):
            assert label == k // 4  # the class of image k
            seen.append(k)
    assert len(seen) == len(set(seen)) >= 6 and set(seen) <= {k for k in range(12) if k not in (0, 5)}  # the epoch's whole batches
    with pytest.raises(ValueError, match="without a mask sampler"):
        next(iter(labelled.epoch(0, 0, 0)))
