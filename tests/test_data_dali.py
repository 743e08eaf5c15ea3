"""The dali backend on the CPU (device_id=None): crop windows as the pil backend cuts them, the
DROP-policy pitfall of DALI's own sharding, thread-count independence, undecodable files."""

import os

import numpy as np
import pytest
import torch
from imagefiles import gradient, identify, undecodable_jpeg, write_colour_images
from PIL import Image
from test_data_loader import CPU, data_config, epoch

from fastjepa.config import build_loader
from fastjepa.data.images import load_rgb, random_resized_crop_boxes
from fastjepa.data.loader import backend_problem
from fastjepa.data.normalize import normalize

pytestmark = pytest.mark.skipif(backend_problem("dali", CPU) is not None, reason=f"dali backend: {backend_problem('dali', CPU)}")


def test_crops_are_the_windows_drawn_on_the_host_resized_like_pil(tmp_path):
    for i in range(8):
        gradient(90 + 7 * i, 70 + 5 * i, seed=i).save(tmp_path / f"{i}.png")
    loader = build_loader(data_config(tmp_path, "dali", use_horizontal_flip=True), CPU, seed=2, root=str(tmp_path))
    batches = epoch(loader, 0)
    loader.order.set_epoch(0)
    loader.order.skip(0)
    index = loader.epoch_indices().reshape(-1, 4)
    flipped = 0
    for b, batch in enumerate(batches):
        g = loader.crop_generator(0, b)
        left, top, w, h = random_resized_crop_boxes(loader.widths[index[b]], loader.heights[index[b]], g, (0.3, 1.0))
        mirror = loader.flips(4, g)
        flipped += int(mirror.sum())
        expected = []
        for k, i in enumerate(index[b]):
            crop = load_rgb(loader.paths[i]).crop((left[k], top[k], left[k] + w[k], top[k] + h[k])).resize((48, 48), Image.Resampling.BILINEAR)
            if mirror[k]:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            expected.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1))
        difference = (batch.images - normalize(torch.stack(expected))).abs() * 255 * 0.226  # ~ levels of 0..255
        assert difference.mean() < 0.5 and difference.max() < 4, (b, difference.mean(), difference.max())
    assert 0 < flipped < 8


def test_dali_reader_sharding_under_drop_loses_samples_ours_does_not(tmp_path):
    """The pitfall: 7 files in DALI's own 2 shards (3 and 4 files) with batch 2 and the DROP
    policy give each rank 1 batch, so 3 of 7 files are never read in the epoch. fastjepa gives
    each reader only its rank's files in whole batches."""
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    files = write_colour_images(tmp_path, 7)
    read = []
    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def labels(shard):
        _, label = fn.readers.file(files=files, labels=list(range(7)), name="reader", shard_id=shard, num_shards=2, pad_last_batch=True)
        return label

    for shard in range(2):
        pipe = labels(shard)
        pipe.build()
        read += [i for batch in DALIGenericIterator([pipe], ["label"], reader_name="reader", last_batch_policy=LastBatchPolicy.DROP)
                 for i in batch[0]["label"].flatten().tolist()]
    assert len(read) == 4 and len(set(read)) == 4  # 3 files lost in every epoch

    ranks = [build_loader(data_config(tmp_path, "dali", batch_size=1), CPU, seed=0, root=str(tmp_path), rank=r, world_size=2) for r in range(2)]
    seen = [[i for b in epoch(r, 0) for i in identify(b.images)] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 3 and len(set(seen[0] + seen[1])) == 6  # one of 7 left out, a new one each epoch


def test_the_number_of_dali_threads_does_not_change_the_batches(tmp_path):
    write_colour_images(tmp_path, 12)
    one = epoch(build_loader(data_config(tmp_path, "dali", num_workers=1), CPU, seed=0, root=str(tmp_path)), 0)
    two = epoch(build_loader(data_config(tmp_path, "dali", num_workers=2), CPU, seed=0, root=str(tmp_path)), 0)
    assert all(torch.equal(a.images, b.images) for a, b in zip(one, two)) and len(one) == len(two) == 3


def test_an_undecodable_file_is_left_out_of_its_batch_and_the_rest_is_unchanged(tmp_path):
    write_colour_images(tmp_path, 8)
    config = data_config(tmp_path, "dali")
    clean = epoch(build_loader(config, CPU, seed=0, root=str(tmp_path)), 0)
    victim = identify(clean[1].images)[2]  # the third image of the second batch
    path = tmp_path / f"{victim:03d}.jpg"
    path.write_bytes(undecodable_jpeg())  # complete file: passes the header check, fails in DALI
    loader = build_loader(config, CPU, seed=0, root=str(tmp_path))
    broken = epoch(loader, 0)
    assert [b.bad for b in broken] == [0, 1] and torch.equal(broken[0].images, clean[0].images)
    assert torch.equal(broken[1].images, clean[1].images[[0, 1, 3]])  # the others keep their crops
    assert loader.failed == {loader.paths.index(str(path))}
    assert [b.bad for b in epoch(loader, 0)] == [0, 1]  # known from now on: no new failure


def test_a_dali_error_without_a_file_name_is_one_line(tmp_path, monkeypatch):
    from fastjepa.data.dali import DaliLoader

    write_colour_images(tmp_path, 4)
    loader = build_loader(data_config(tmp_path, "dali"), CPU, seed=0, root=str(tmp_path))

    def fail(self):
        raise RuntimeError("Critical error in pipeline:\nsomething DALI says")
        yield

    monkeypatch.setattr(DaliLoader, "_run", fail)
    with pytest.raises(ValueError, match=r"^DALI failed to decode one of 4 files \(.*\): something DALI says; `fastjepa data verify .* --move-to DIR`"):
        epoch(loader, 0)
    assert os.path.exists(tmp_path / "000.jpg")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_gpu_graph_matches_the_cpu_graph(tmp_path):
    for i in range(8):
        gradient(90 + 7 * i, 70 + 5 * i, seed=i).save(tmp_path / f"{i}.jpg", quality=95)
    config = data_config(tmp_path, "dali", use_horizontal_flip=True)
    on_cpu = epoch(build_loader(config, CPU, seed=0, root=str(tmp_path)), 0)
    on_gpu = epoch(build_loader(config, torch.device("cuda"), seed=0, root=str(tmp_path)), 0)
    for a, b in zip(on_cpu, on_gpu):
        assert b.images.is_cuda and all(m.is_cuda for m in b.masks_enc + b.masks_pred)
        assert ((a.images - b.images.cpu()).abs() * 255 * 0.226).mean() < 1.5  # nvJPEG and libjpeg-turbo round differently


def test_a_dropped_loader_frees_its_pipeline_at_once(tmp_path):
    """No reference cycle through the pipeline's source: the cyclic collector could otherwise
    free it later, even in a forked DataLoader worker, where DALI's threads do not exist."""
    import gc
    import weakref

    write_colour_images(tmp_path, 8)
    loader = build_loader(data_config(tmp_path, "dali"), CPU, seed=0, root=str(tmp_path))
    assert len(epoch(loader, 0)) == 2 and len(epoch(loader, 1)) == 2  # the second epoch reuses the pipeline
    pipeline = weakref.ref(loader.iterator)
    gc.disable()
    try:
        del loader
        assert pipeline() is None
    finally:
        gc.enable()
