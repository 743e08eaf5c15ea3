"""webdataset tar shards: listing, the member view, every backend reading shards exactly as it
reads the same images as loose files, the header check and verify on members, broken shards."""

import io
import os
import tarfile

import pytest
import test_data_loader
from conftest import run_as_ranks
from imagefiles import gradient, identify, jpeg_bytes, undecodable_jpeg, write_colour_images
from test_data_loader import CPU, assert_same_batches, data_config, epoch

from fastjepa.cli import main
from fastjepa.config import build_loader
from fastjepa.data.images import ImageRef, list_images, load_rgb, open_image, read_image_bytes
from fastjepa.data.scan import check_file, scan_folder
from fastjepa.data.shards import MemberFile, index_shard

backend = test_data_loader.backend  # the data backends' fixture (pil, dali, torchvision), not conftest's ops backends


def write_shard(path, members: list[tuple[str, bytes]]) -> str:
    """A tar with the given (name, bytes) members, in that order."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def shard_the_images(files: list[str], folder, per_shard: int) -> list[str]:
    """The files as webdataset samples (<key>.jpg plus a <key>.cls label member), per_shard per tar."""
    shards = []
    for s in range(0, len(files), per_shard):
        members = []
        for path in files[s : s + per_shard]:
            key = os.path.splitext(os.path.basename(path))[0]
            members += [(f"{key}.jpg", open(path, "rb").read()), (f"{key}.cls", b"7")]
        shards.append(write_shard(os.path.join(folder, f"train-{s // per_shard:06d}.tar"), members))
    return shards


def test_member_file_reads_seeks_and_stops_at_the_member_end(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"0123456789abcdef")
    with io.BufferedReader(MemberFile(str(path), 4, 6)) as f:
        assert f.read() == b"456789"
        assert f.seek(-2, os.SEEK_END) == 4 and f.read(10) == b"89"
        assert f.seek(1) == 1 and f.read(2) == b"56" and f.tell() == 3
        assert f.seek(100) == 100 and f.read() == b""
    assert read_image_bytes(ImageRef("blob/x", str(path), 10, 3)) == b"abc"
    assert read_image_bytes(ImageRef(str(path), str(path))) == b"0123456789abcdef"


def test_listing_takes_the_image_members_of_every_shard_with_the_class_of_its_folder(tmp_path):
    loose = write_colour_images(tmp_path / "src", 5)
    shard_the_images(loose[:3], tmp_path / "data" / "cats", per_shard=2)  # 2 shards: 2 + 1 images
    write_colour_images(tmp_path / "data" / "dogs", 2)
    listing = list_images(tmp_path / "data")
    assert listing.classes == ["cats", "dogs"] and listing.labels == [0, 0, 0, 1, 1]
    shard0 = str(tmp_path / "data" / "cats" / "train-000000.tar")
    assert listing.paths[:3] == [f"{shard0}/000.jpg", f"{shard0}/001.jpg", str(tmp_path / "data" / "cats" / "train-000001.tar") + "/002.jpg"]
    assert listing.skipped == []  # the .cls members are not files of the folder
    for i in range(3):  # each member's bytes are the original file's
        assert read_image_bytes(listing.ref(i)) == open(loose[i], "rb").read()
    assert listing.ref(3) == ImageRef(listing.paths[3], listing.paths[3])
    subset = listing.take([4, 1])
    assert subset.paths == [listing.paths[4], listing.paths[1]] and subset.ref(1) == listing.ref(1)


def test_a_shard_without_images_adds_nothing_and_a_folder_of_such_shards_is_empty(tmp_path):
    write_shard(tmp_path / "meta.tar", [("a.json", b"{}"), ("a.cls", b"1")])
    with pytest.raises(ValueError, match="empty dataset: no images under .* as files and in .tar shards"):
        list_images(tmp_path)
    write_colour_images(tmp_path, 1)
    assert len(list_images(tmp_path)) == 1


def test_a_file_named_tar_that_is_not_one_is_a_one_line_error_naming_it(tmp_path):
    write_colour_images(tmp_path, 2)
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ValueError, match=r"broken.tar is not a readable tar shard"):
        list_images(tmp_path)
    with pytest.raises(ValueError, match=r"broken.tar is not a readable tar shard"):
        index_shard(str(tmp_path / "broken.tar"), lambda name: True)


def test_every_backend_reads_shards_exactly_as_the_same_loose_files(tmp_path, backend):
    loose = write_colour_images(tmp_path / "loose", 12)
    shard_the_images(loose, tmp_path / "shards", per_shard=5)  # 3 shards: 5, 5, 2
    config = dict(use_horizontal_flip=True, repeat=2)
    files = build_loader(data_config(tmp_path / "loose", backend, **config), CPU, seed=4, root=str(tmp_path / "loose"))
    shards = build_loader(data_config(tmp_path / "shards", backend, **config), CPU, seed=4, root=str(tmp_path / "shards"))
    assert shards.num_images == 12 and shards.steps_per_epoch == 6
    for e in range(2):
        assert_same_batches(epoch(files, e), epoch(shards, e))
    assert_same_batches(epoch(files, 1, start_itr=4), epoch(shards, 1, start_itr=4))  # mid-epoch resume


def test_a_bad_member_is_left_out_by_the_header_check_and_counted(tmp_path, backend):
    loose = write_colour_images(tmp_path / "src", 8)
    members = [(os.path.basename(p), open(p, "rb").read()) for p in loose]
    members[3] = (members[3][0], members[3][1][: len(members[3][1]) // 2])  # truncated JPEG
    members.append(("notes.txt.jpg", b"not an image at all"))
    shard = write_shard(tmp_path / "data" / "s.tar", members)
    loader = build_loader(data_config(tmp_path / "data", backend, batch_size=1), CPU, seed=0, root=str(tmp_path / "data"))
    seen = sorted(i for batch in epoch(loader, 0) for i in identify(batch.images))
    if backend == "pil":  # no header check: the decode fails in the worker and the image is counted bad
        assert loader.num_images == 9 and seen == [0, 1, 2, 4, 5, 6, 7]
    else:
        assert loader.num_images == 7 and seen == [0, 1, 2, 4, 5, 6, 7]
        assert sorted(name for name, _ in loader.rejected) == [f"{shard}/003.jpg", f"{shard}/notes.txt.jpg"]


def test_the_header_check_reads_a_members_header_and_tail_only(tmp_path):
    data = jpeg_bytes(gradient(200, 150))  # a few KiB of image data after the header
    shard = write_shard(tmp_path / "data" / "s.tar", [("a.jpg", data), ("b.jpg", data[:-500])])
    scan = scan_folder(str(tmp_path / "data"))
    assert scan.images.paths == [f"{shard}/a.jpg"] and (scan.widths.tolist(), scan.heights.tolist()) == ([200], [150])
    assert scan.rejected == [(f"{shard}/b.jpg", "truncated JPEG (no end marker)")]
    ref = list_images(str(tmp_path / "data")).ref(0)
    assert check_file(ref).format == "JPEG" and load_rgb(ref).size == (200, 150)
    with open_image(ref) as f:
        assert f.read() == data


def test_verify_lists_bad_members_and_broken_shards_and_moves_only_files(tmp_path, capsys):
    loose = write_colour_images(tmp_path / "src", 3)
    good = open(loose[0], "rb").read()
    shard = write_shard(tmp_path / "data" / "s.tar", [("a.jpg", good), ("b.jpg", undecodable_jpeg()), ("b.cls", b"1")])
    (tmp_path / "data" / "broken.tar").write_bytes(b"x" * 700)
    code = main(["data", "verify", str(tmp_path / "data"), "--workers", "1", "--move-to", str(tmp_path / "aside")])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and out[-1] == f"2 of 3 image files are bad, moved to {tmp_path / 'aside'}"
    assert any(line.startswith(f"{tmp_path / 'data' / 'broken.tar'}: is not a readable tar shard") and "moved to" in line for line in out)
    assert any(line.startswith(f"{shard}/b.jpg: ") and "inside a tar shard: not moved" in line for line in out)
    assert os.path.exists(tmp_path / "aside" / "broken.tar") and os.path.exists(shard)


def test_dry_run_counts_shards_without_opening_them(tmp_path, capsys):
    shard_the_images(write_colour_images(tmp_path / "src", 3), tmp_path / "data", per_shard=2)
    assert main(["train", "--set", f"data.root_path={tmp_path}", "--set", "data.image_folder=data", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 files (listed, not read)" in out and "2 of them .tar shards (their images are counted when training starts)" in out
    assert "steps          unknown until the images are listed" in out


def test_ranks_share_the_shard_indexes_each_shard_read_once(tmp_path, monkeypatch):
    import fastjepa.data.images as images

    shard_the_images(write_colour_images(tmp_path / "src", 7), tmp_path / "data", per_shard=2)  # 4 shards
    alone = list_images(tmp_path / "data")
    indexed = []
    real = images.index_shard
    monkeypatch.setattr(images, "index_shard", lambda path, is_image: indexed.append(path) or real(path, is_image))
    results = run_as_ranks(2, lambda r, gather: list_images(tmp_path / "data", r, 2, gather))
    assert sorted(indexed) == sorted(alone.shards)  # each shard once, in all
    for result in results:
        assert result.paths == alone.paths and result.labels == alone.labels and result.shards == alone.shards
        assert (result.offsets == alone.offsets).all() and (result.sizes == alone.sizes).all()


def test_a_broken_shard_indexed_by_one_rank_raises_on_every_rank(tmp_path):
    shard_the_images(write_colour_images(tmp_path / "src", 4), tmp_path / "data", per_shard=2)  # 2 shards
    (tmp_path / "data" / "train-000001.tar").write_bytes(b"not a tar" * 100)  # indexed by rank 1 only

    def rank(r, gather):
        try:
            list_images(tmp_path / "data", r, 2, gather)
        except ValueError as error:
            return str(error)

    errors = run_as_ranks(2, rank)  # rank 0 would wait for rank 1 forever if rank 1 raised before the exchange
    assert all(e is not None and "train-000001.tar is not a readable tar shard" in e for e in errors), errors
