"""The torchvision backend's logic on the CPU. Without torchvision, ``decode_jpegs`` is a PIL
stand-in with its contract (see ``backend`` in test_data_loader.py): which files go to the
batched decoder, crop windows, the fallback when one file fails the batched call."""

import numpy as np
import pytest
import torch
from imagefiles import gradient, undecodable_jpeg, write_colour_images, write_every_mode
from PIL import Image
from test_data_loader import CPU, data_config, epoch, fake_decode_jpegs

import fastjepa.data.torchvision_gpu as torchvision_gpu
from fastjepa.config import build_loader
from fastjepa.data.images import load_rgb, random_resized_crop_boxes
from fastjepa.data.loader import backend_problem
from fastjepa.data.normalize import normalize


@pytest.fixture
def decoder_calls(monkeypatch):
    """The batches of file sizes each decode_jpegs call gets (PIL stand-in without torchvision)."""
    calls = []
    real = torchvision_gpu.decode_jpegs if backend_problem("torchvision", CPU) is None else fake_decode_jpegs
    monkeypatch.setattr("fastjepa.data.loader.backend_problem", lambda name, device: None)
    monkeypatch.setattr(torchvision_gpu, "decode_jpegs", lambda encoded, device: calls.append([len(e) for e in encoded]) or real(encoded, device))
    return calls


def test_colour_jpegs_go_to_the_batched_decoder_the_rest_to_pil_workers(tmp_path, decoder_calls):
    write_colour_images(tmp_path / "jpeg", 3)
    write_every_mode(tmp_path / "other")  # gray and CMYK JPEGs, PNGs (and one colour progressive JPEG)
    loader = build_loader(data_config(tmp_path, "torchvision", batch_size=3), CPU, seed=0, root=str(tmp_path))
    on_device = sorted(p.rsplit("/", 1)[-1] for p, d in zip(loader.paths, loader.on_device) if d)
    assert on_device == ["000.jpg", "001.jpg", "002.jpg", "progressive.jpg"]
    batches = epoch(loader, 0)
    assert sum(len(b.images) for b in batches) == 9 and sum(b.bad for b in batches) == 0
    assert sum(len(c) for c in decoder_calls) == 4 and len(decoder_calls) <= 3  # one call per batch


def test_crops_are_the_windows_drawn_on_the_host_resized_with_antialiasing(tmp_path, decoder_calls):
    for i in range(4):
        gradient(90 + 7 * i, 70 + 5 * i, seed=i).save(tmp_path / f"{i}.jpg", quality=95)
    loader = build_loader(data_config(tmp_path, "torchvision", use_horizontal_flip=True), CPU, seed=4, root=str(tmp_path))
    batch = epoch(loader, 0)[0]
    loader.order.set_epoch(0)
    loader.order.skip(0)
    index = loader.epoch_indices()
    g = loader.crop_generator(0, 0)
    left, top, w, h = random_resized_crop_boxes(loader.widths[index], loader.heights[index], g, (0.3, 1.0))
    mirror = loader.flips(4, g)
    expected = []
    for k, i in enumerate(index):
        crop = load_rgb(loader.paths[i]).crop((left[k], top[k], left[k] + w[k], top[k] + h[k])).resize((48, 48), Image.Resampling.BILINEAR)
        expected.append(torch.from_numpy(np.array(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror[k] else crop)).permute(2, 0, 1))
    difference = (batch.images - normalize(torch.stack(expected))).abs() * 255 * 0.226
    assert difference.mean() < 0.5 and difference.max() < 4


def test_one_undecodable_jpeg_fails_the_batched_call_and_only_itself(tmp_path, decoder_calls):
    write_colour_images(tmp_path, 4)
    (tmp_path / "000.jpg").write_bytes(undecodable_jpeg())
    loader = build_loader(data_config(tmp_path, "torchvision"), CPU, seed=0, root=str(tmp_path))
    (batch,) = epoch(loader, 0)
    assert len(batch.images) == 3 and batch.bad == 1
    assert [len(c) for c in decoder_calls] == [4, 1, 1, 1, 1]  # the batch, then one by one


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or backend_problem("torchvision", CPU) is not None, reason="needs a GPU and torchvision")
def test_decoding_on_the_gpu_matches_the_cpu(tmp_path):
    for i in range(8):
        gradient(90 + 7 * i, 70 + 5 * i, seed=i).save(tmp_path / f"{i}.jpg", quality=95)
    write_every_mode(tmp_path / "other")  # decoded with PIL in the workers, then joined on the GPU
    config = data_config(tmp_path, "torchvision", use_horizontal_flip=True, batch_size=7, num_workers=2)
    on_cpu = epoch(build_loader(config, CPU, seed=0, root=str(tmp_path)), 0)
    on_gpu = epoch(build_loader(config, torch.device("cuda"), seed=0, root=str(tmp_path)), 0)
    for a, b in zip(on_cpu, on_gpu):
        assert b.images.is_cuda and all(m.is_cuda for m in b.masks_enc + b.masks_pred) and b.bad == 0
        difference = (a.images - b.images.cpu()).abs() * 255 * 0.226
        assert difference.mean() < 1.5, difference.mean()  # nvJPEG and libjpeg-turbo round differently
