"""fastjepa.datasets: the reference's ImageNet, ImageNetSubset, make_imagenet1k, copy_imgnt_locally,
and the ImageFolder used without torchvision."""

import os
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
from imagefiles import colour, write_bad_files
from PIL import Image

import fastjepa.datasets.imagenet1k as imagenet1k
from fastjepa.datasets.folder import IMG_EXTENSIONS, ImageFolder
from fastjepa.datasets.imagenet1k import ImageNet, ImageNetSubset, copy_imgnt_locally, make_imagenet1k

FOLDER = "imagenet_full_size/061417/"
WNIDS = ("n01440764", "n01443537", "n01484850")


def write_image(path, index: int = 0, fmt: str = "PNG", mode: str = "RGB"):
    """A tiny solid image of colour(index) (PNG keeps it exact: its red channel identifies it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (6 + index % 3, 5), colour(index)).convert(mode).save(path, fmt)


def write_text(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("not an image")


def make_tree(top, outside):
    """Classes with nested folders, upper-case extensions, non-image files and symlinked folders."""
    write_image(f"{top}/cat/b.JPEG", fmt="JPEG")
    write_image(f"{top}/cat/a.png")
    write_image(f"{top}/cat/A.Png")
    write_text(f"{top}/cat/notes.txt")
    write_text(f"{top}/cat/x.jpg.txt")
    write_text(f"{top}/cat/noext")
    write_image(f"{top}/cat/a/x.jpeg", fmt="JPEG")
    write_image(f"{top}/cat/a-b/y.bmp", fmt="BMP")
    write_image(f"{top}/cat/a/deep/z.TIFF", fmt="TIFF")
    os.makedirs(f"{top}/cat/empty")
    write_image(f"{top}/Dog/c.gif", fmt="GIF")  # .gif is not one of torchvision's extensions
    write_image(f"{top}/Dog/d.PPM", fmt="PPM")
    write_image(f"{outside}/inner/e.webp", fmt="WEBP")
    os.symlink(f"{outside}/inner", f"{top}/Dog/link")
    write_image(f"{outside}/linked/f.png")
    os.symlink(f"{outside}/linked", f"{top}/linked_class")
    write_image(f"{top}/loose.png")  # a file in root is no class
    write_text(f"{top}/README")


EXPECTED_CLASSES = ["Dog", "cat", "linked_class"]
EXPECTED_SAMPLES = [  # the walk is sorted by folder path: "a" < "a-b" < "a/deep" ('-' < '/')
    ("Dog/d.PPM", 0),
    ("Dog/link/e.webp", 0),
    ("cat/A.Png", 1),
    ("cat/a.png", 1),
    ("cat/b.JPEG", 1),
    ("cat/a/x.jpeg", 1),
    ("cat/a-b/y.bmp", 1),
    ("cat/a/deep/z.TIFF", 1),
    ("linked_class/f.png", 2),
]


@pytest.fixture
def tree(tmp_path):
    top = tmp_path / "tree"
    make_tree(str(top), str(tmp_path / "outside"))
    return str(top)


def test_image_folder_lists_like_torchvision(tree):
    dataset = ImageFolder(tree)
    assert dataset.root == tree and dataset.extensions == IMG_EXTENSIONS
    assert dataset.classes == EXPECTED_CLASSES
    assert dataset.class_to_idx == {"Dog": 0, "cat": 1, "linked_class": 2}
    assert [(os.path.relpath(path, tree), target) for path, target in dataset.samples] == EXPECTED_SAMPLES
    assert all(path == os.path.join(tree, rel) for (path, _), (rel, _) in zip(dataset.samples, EXPECTED_SAMPLES))
    assert dataset.imgs is dataset.samples and dataset.targets == [t for _, t in EXPECTED_SAMPLES] and len(dataset) == 9
    img, target = dataset[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and target == 0


def test_image_folder_equals_torchvisions(tree):
    datasets = pytest.importorskip("torchvision.datasets", reason="the comparison needs torchvision")
    for root in (tree, tree + "/"):
        theirs, ours = datasets.ImageFolder(root), ImageFolder(root)
        assert (theirs.classes, theirs.class_to_idx, theirs.samples, theirs.targets) == (ours.classes, ours.class_to_idx, ours.samples, ours.targets)


def test_image_folder_transforms_and_loads_rgb(tmp_path):
    write_image(str(tmp_path / "a" / "gray.png"), index=2, mode="L")
    write_image(str(tmp_path / "b" / "palette.png"), index=3, mode="P")
    dataset = ImageFolder(str(tmp_path), transform=lambda img: (img.mode, img.size), target_transform=lambda t: t + 10)
    assert dataset[0] == (("RGB", (8, 5)), 10) and dataset[1] == (("RGB", (6, 5)), 11)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(str(tmp_path / "missing"))
    write_image(str(tmp_path / "loose.png"))
    with pytest.raises(FileNotFoundError, match="Couldn't find any class folder in " + str(tmp_path)):
        ImageFolder(str(tmp_path))
    write_image(str(tmp_path / "full" / "a.png"))
    write_text(str(tmp_path / "textonly" / "a.txt"))
    os.makedirs(tmp_path / "void" / "sub")
    with pytest.raises(FileNotFoundError, match="no valid file for the classes textonly, void in .*Supported extensions are: .jpg, .jpeg"):
        ImageFolder(str(tmp_path))
    assert len(ImageFolder(str(tmp_path), allow_empty=True)) == 1


def make_imagenet(root, counts=(3, 2, 4), split="train"):
    """root/FOLDER/split/<wnid>/<wnid>_<k>.png; image number i (in listing order) has colour(i)."""
    i = 0
    for wnid, count in zip(WNIDS, counts):
        for k in range(count):
            write_image(os.path.join(root, FOLDER, split, wnid, f"{wnid}_{k}.png"), index=i)
            i += 1
    return i


def red(img) -> int:
    return img.getpixel((0, 0))[0]


def test_imagenet_reads_the_train_and_val_folders(tmp_path):
    root = str(tmp_path)
    make_imagenet(root)
    make_imagenet(root, counts=(1, 1, 1), split="val")
    train = ImageNet(root, image_folder=FOLDER, copy_data=False)
    assert train.root == os.path.join(root, FOLDER, "train/") and train.classes == list(WNIDS)
    assert [os.path.basename(p) for p, _ in train.samples] == [f"{w}_{k}.png" for w, n in zip(WNIDS, (3, 2, 4)) for k in range(n)]
    assert train.targets == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert [red(train[i][0]) for i in range(len(train))] == [colour(i)[0] for i in range(9)]
    val = ImageNet(root, image_folder=FOLDER, train=False, copy_data=False, transform=red)
    assert len(val) == 3 and val[2] == (colour(2)[0], 2)


def test_imagenet_index_targets(tmp_path):
    root = str(tmp_path)
    make_imagenet(root, counts=(3, 1, 2))
    dataset = ImageNet(root, image_folder=FOLDER, copy_data=False, index_targets=True)
    assert isinstance(dataset.targets, np.ndarray) and dataset.targets.tolist() == [0, 0, 0, 1, 2, 2]
    assert isinstance(dataset.samples, np.ndarray) and dataset.samples.shape == (6, 2)
    assert dataset.target_indices == [[0, 1, 2], [3], [4, 5]]  # a list even for a class of one image


def test_imagenet_errors_name_the_problem(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"expected the folder '{root}/{FOLDER}train/'"):
        ImageNet(root, image_folder=FOLDER, copy_data=False)
    with pytest.raises(ValueError, match="needs a root folder"):
        ImageNet(None, image_folder=FOLDER, copy_data=False)
    with pytest.raises(ValueError, match="image folder"):
        make_imagenet1k(None, 2, root_path=root, image_folder=None, num_workers=0, pin_mem=False)
    make_imagenet(root)
    bad = write_bad_files(os.path.join(root, FOLDER, "train", WNIDS[0]))
    dataset = ImageNet(root, image_folder=FOLDER, copy_data=False)
    for name, path in bad.items():
        index = [p for p, _ in dataset.samples].index(path)
        with pytest.raises(OSError, match=f"cannot read image '{path}'"):
            dataset[index]


def test_imagenet_subset(tmp_path):
    root = str(tmp_path)
    make_imagenet(root)
    subset_file = tmp_path / "subset.txt"
    subset_file.write_text("n01484850_3.png\nn01440764_0.png\n\nn01443537_1.png\n")
    dataset = ImageNet(root, image_folder=FOLDER, copy_data=False, transform=red)
    dataset.target_transform = lambda t: -t
    subset = ImageNetSubset(dataset, str(subset_file))
    base = os.path.join(root, FOLDER, "train/")
    assert subset.samples == [(os.path.join(base, "n01484850", "n01484850_3.png"), 2), (os.path.join(base, "n01440764", "n01440764_0.png"), 0),
                              (os.path.join(base, "n01443537", "n01443537_1.png"), 1)]
    assert len(subset) == 3 and subset.classes == list(WNIDS)
    assert [subset[i] for i in range(3)] == [(colour(8)[0], -2), (colour(0)[0], 0), (colour(4)[0], -1)]

    subset_file.write_text("n01440764_0.png\nn09999999_1.png\n")
    with pytest.raises(ValueError, match=r"subset.txt, line 2: 'n09999999_1.png' names class 'n09999999', which is not a class"):
        ImageNetSubset(dataset, str(subset_file))
    subset_file.write_text("n01440764_7.png\n")
    with pytest.raises(OSError, match="cannot read image .*n01440764_7.png"):
        ImageNetSubset(dataset, str(subset_file))[0]


def collate(batch):
    return [img for img, _ in batch], [target for _, target in batch]


@pytest.mark.parametrize("drop_last", [True, False])
def test_make_imagenet1k_splits_the_samples_over_ranks(tmp_path, drop_last):
    root = str(tmp_path)
    count = make_imagenet(root, counts=(4, 3, 4))  # 11 images: 6 per rank, the sampler pads with a repeat
    per_rank = {}
    for rank in (0, 1):
        dataset, loader, sampler = make_imagenet1k(red, batch_size=4, collator=collate, pin_mem=False, num_workers=0, world_size=2, rank=rank,
                                                   root_path=root, image_folder=FOLDER, drop_last=drop_last)
        assert isinstance(dataset, ImageNet) and len(dataset) == count
        assert isinstance(sampler, torch.utils.data.distributed.DistributedSampler)
        assert (sampler.num_replicas, sampler.rank, sampler.shuffle, sampler.seed, sampler.drop_last) == (2, rank, True, 0, False)
        assert loader.sampler is sampler and loader.collate_fn is collate and loader.batch_size == 4 and loader.drop_last == drop_last
        assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (0, False, False)
        expected = list(torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=2, rank=rank))
        batches = list(loader)
        assert len(loader) == len(batches) == (1 if drop_last else 2)
        assert [len(images) for images, _ in batches] == ([4] if drop_last else [4, 2])
        assert [r for images, _ in batches for r in images] == [colour(i)[0] for i in expected[: 4 * len(batches)]]
        assert [t for _, targets in batches for t in targets] == [dataset.targets[i] for i in expected[: 4 * len(batches)]]
        per_rank[rank] = expected
        sampler.set_epoch(1)
        assert list(sampler) != expected
    assert sorted(set(per_rank[0]) | set(per_rank[1])) == list(range(count))


def test_make_imagenet1k_with_a_subset_file(tmp_path):
    root = str(tmp_path)
    make_imagenet(root)
    subset_file = tmp_path / "subset.txt"
    subset_file.write_text("".join(f"{WNIDS[2]}_{k}.png\n" for k in range(4)))
    dataset, loader, _ = make_imagenet1k(red, batch_size=2, collator=collate, pin_mem=False, num_workers=0, root_path=root, image_folder=FOLDER,
                                         subset_file=str(subset_file))
    assert isinstance(dataset, ImageNetSubset) and len(dataset) == 4 and len(loader) == 2
    assert sorted(r for images, _ in loader for r in images) == [colour(i)[0] for i in range(5, 9)]


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """SCRATCH_DIR in tmp_path, no SLURM variables, a fast poll."""
    monkeypatch.setattr(imagenet1k, "SCRATCH_DIR", str(tmp_path / "scratch"))
    monkeypatch.setattr(imagenet1k, "COPY_POLL_SECONDS", 0.01)
    monkeypatch.delenv("SLURM_JOBID", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    return tmp_path / "scratch"


def make_tar(tmp_path):
    """network/<tar> holding imagenet_full_size/061417/train/... (3 classes, 9 images)."""
    source = tmp_path / "source"
    make_imagenet(str(source))
    network = tmp_path / "network"
    network.mkdir()
    with tarfile.open(network / "imagenet_full_size-061417.tar.gz", "w:gz") as archive:
        archive.add(source / "imagenet_full_size", arcname="imagenet_full_size")
    return str(network)


def test_copy_imgnt_locally_needs_slurm(scratch, tmp_path):
    assert copy_imgnt_locally(str(tmp_path), "train/") is None
    assert copy_imgnt_locally(str(tmp_path), "train/", job_id="7") is None  # no SLURM_LOCALID
    assert not scratch.exists()


def test_copy_imgnt_locally_extracts_on_local_rank_0(scratch, tmp_path, monkeypatch):
    network = make_tar(tmp_path)
    monkeypatch.setenv("SLURM_JOBID", "123")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    path = copy_imgnt_locally(network, "train/")
    assert path == f"{scratch}/123/{FOLDER}train/"
    assert sorted(os.listdir(path)) == list(WNIDS) and len(os.listdir(os.path.join(path, WNIDS[2]))) == 4
    assert (scratch / "123" / "copy_signal.txt").read_text() == "Done copying locally.\n"
    dataset = ImageNet(network, copy_data=True)  # the default image_folder and tar_file are the reference's
    assert dataset.root == path and len(dataset) == 9
    os.remove(os.path.join(network, "imagenet_full_size-061417.tar.gz"))
    assert copy_imgnt_locally(network, "train/") == path  # already there: nothing to extract


def test_copy_imgnt_locally_other_local_ranks_wait_for_the_signal(scratch, tmp_path):
    target = scratch / "55"
    target.mkdir(parents=True)

    def signal():
        time.sleep(0.1)
        (target / "copy_signal.txt").write_text("Done copying locally.\n")

    writer = threading.Thread(target=signal)
    writer.start()
    start = time.time()
    path = copy_imgnt_locally(str(tmp_path), "val/", job_id=55, local_rank=1)
    writer.join()
    assert path == f"{target}/{FOLDER}val/" and time.time() - start >= 0.1


def test_copy_imgnt_locally_names_a_missing_or_corrupt_tar(scratch, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"archive '{tmp_path}/imagenet_full_size-061417.tar.gz' not found"):
        copy_imgnt_locally(str(tmp_path), "train/", job_id=1, local_rank=0)
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip" * 10)
    with pytest.raises(RuntimeError, match=f"cannot extract ImageNet archive '{tmp_path}/broken.tar.gz'"):
        copy_imgnt_locally(str(tmp_path), "train/", tar_file="broken.tar.gz", job_id=2, local_rank=0)
    assert not (scratch / "2" / "copy_signal.txt").exists()
