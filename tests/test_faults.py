"""Fault injection: what fastjepa says and keeps when a file is untrusted, the disk fills, or a
writer is killed mid-write (issue 31).

1. A checkpoint whose pickle would run code (``__reduce__`` -> ``os.system`` creating a marker
   file), into every reader: read_checkpoint, the reference twin load_checkpoint, load_encoder,
   export_weights, and on the command line train --resume, meta.init_weights, eval
   --checkpoint / --weights and export. The global is named, nothing ran (no marker).
2. A full disk at every writer, through a writer that fails with ENOSPC after writing part of
   the file: save_checkpoint, the trainer's latest and numbered checkpoints, export (hf, timm,
   safetensors), the eval feature cache and the eval results; the free-space check before
   writing; and on a real small tmpfs (root only), through the command line and past the check.
3. A checkpoint write killed with SIGKILL: the previous file is intact, a live writer's
   temporary file is left alone, and the next write removes the dead writer's.

Each checks the message (one line on the command line, exit code 1), that the previous file
is intact, and that no temporary file is left.
"""

import copy
import errno
import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import enospc_torch_save

import fastjepa.files as files
import fastjepa.helper as helper
from fastjepa.cli import main as cli
from fastjepa.config import tiny_preset
from fastjepa.errors import DiskFullError
from fastjepa.files import remove_stale, temporary_files
from fastjepa.helper import CheckpointError, UnsafeCheckpointError, init_opt, load_checkpoint, read_checkpoint, save_checkpoint
from fastjepa.models.vision_transformer import vit_predictor, vit_tiny
from fastjepa.run import Checkpointer
from fastjepa.train import CHECKPOINT_FREQ, save_epoch_end
from fastjepa.utils.schedulers import momentum_schedule

LATEST = "jepa-latest.pth.tar"
# The smallest run: 4 x 4 patches of 8 px, a 1-block predictor, batch 2 over the 12 embedded photos.
SMALL_ARGS = ["--no-progress", "--set", "data.crop_size=32", "--set", "data.batch_size=2", "--set", "data.repeat=1",
              "--set", "meta.pred_depth=1", "--set", "mask.min_keep=0"]
REAL_SAVE = torch.save
SIZE = r"\d+(\.\d+)? (B|KiB|MiB|GiB)"


def run_cli(argv) -> int:
    """``fastjepa ARGV`` in this process: its exit code (argparse exits with SystemExit)."""
    try:
        return cli([str(arg) for arg in argv])
    except SystemExit as exit:
        return exit.code


def one_line(capsys, command: str) -> str:
    """The command's one line on stderr (asserted to be one, and fastjepa's own)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastjepa {command}: "), err
    return err[0]


def digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files and names."""
    if path.is_dir():
        return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.iterdir()))).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


# --------------------------------------------------------------------------- 1. unsafe pickles


class RunsCode:
    """Pickles as a call of os.system that creates ``marker``: harmless, and visible if it ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def unsafe(tmp_path):
    """A checkpoint that is well formed but for one entry whose unpickling runs a command."""
    marker = tmp_path / "code-ran"
    encoder = {k: v for k, v in vit_tiny(img_size=[32], patch_size=8, depth=1).state_dict().items()}
    path = tmp_path / "downloaded.pth.tar"
    torch.save({"encoder": encoder, "target_encoder": encoder, "predictor": {}, "epoch": 1, "note": RunsCode(marker)}, path)
    return SimpleNamespace(path=path, marker=marker, digest=digest(path),
                           message=rf"checkpoint {re.escape(str(path))} holds Python objects fastjepa will not unpickle \(posix\.system\): "
                                   r"it is not safe to load, and no code in it ran")


def test_the_payload_runs_code_when_unpickled_without_weights_only(unsafe):
    """The fixture is a real attack: torch.load(weights_only=False) runs it."""
    torch.load(unsafe.path, weights_only=False)
    assert unsafe.marker.exists()


UNSAFE_READERS = {
    "read_checkpoint": lambda path, tmp: read_checkpoint(path),
    "load_checkpoint": lambda path, tmp: load_checkpoint("cpu", path, None, None, None, None, None),  # refused before any model is used
    "load_encoder": lambda path, tmp: __import__("fastjepa.weights", fromlist=["load_encoder"]).load_encoder(path),
    "export_weights": lambda path, tmp: __import__("fastjepa.weights", fromlist=["export_weights"]).export_weights(path, "safetensors",
                                                                                                                   tmp / "out.safetensors"),
}


@pytest.mark.parametrize("reader", list(UNSAFE_READERS))
def test_python_readers_refuse_an_unsafe_pickle_naming_its_global(unsafe, tmp_path, reader):
    with pytest.raises(UnsafeCheckpointError, match=unsafe.message):
        UNSAFE_READERS[reader](unsafe.path, tmp_path)
    assert not unsafe.marker.exists() and digest(unsafe.path) == unsafe.digest
    assert not (tmp_path / "out.safetensors").exists()


def test_an_unsafe_pickle_in_the_legacy_format_is_named_too(unsafe, tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"epoch": 1, "note": RunsCode(unsafe.marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=r"holds Python objects fastjepa will not unpickle \(posix\.system\)"):
        read_checkpoint(legacy)
    assert not unsafe.marker.exists()


UNSAFE_COMMANDS = {
    "train --resume": lambda p, tmp: ["train", "--max-steps", "1", "--out", tmp / "run", "--resume", p, *SMALL_ARGS],
    "train init_weights": lambda p, tmp: ["train", "--max-steps", "1", "--out", tmp / "run", "--set", f"meta.init_weights={p}", *SMALL_ARGS],
    "eval --checkpoint": lambda p, tmp: ["eval", "knn", "--checkpoint", p, "--out", tmp / "eval", "--no-progress"],
    "eval --weights": lambda p, tmp: ["eval", "linear", "--weights", p, "--out", tmp / "eval", "--no-progress"],
    "export": lambda p, tmp: ["export", p, "--format", "safetensors", "--out", tmp / "out.safetensors"],
}


@pytest.mark.parametrize("command", list(UNSAFE_COMMANDS))
def test_commands_refuse_an_unsafe_pickle_in_one_line_exit_1(unsafe, tmp_path, capsys, command):
    assert run_cli(UNSAFE_COMMANDS[command](unsafe.path, tmp_path)) == 1
    line = one_line(capsys, command.split()[0])
    assert re.fullmatch(rf"fastjepa {command.split()[0]}: {unsafe.message}", line), line
    assert not unsafe.marker.exists() and digest(unsafe.path) == unsafe.digest
    assert not (tmp_path / "out.safetensors").exists() and not list(tmp_path.glob("run/*.tar"))


def test_a_truncated_or_foreign_file_is_still_called_so(unsafe, tmp_path):
    """Only whole global names make a file unsafe: a pickle cut inside one (torch says "GLOBAL p.") is a truncated file."""
    raw = tmp_path / "raw.pth"
    torch.save({"epoch": 1, "note": RunsCode(unsafe.marker)}, raw, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(raw.read_bytes()[: raw.read_bytes().index(b"cposix\n") + 3])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*cut\.pth \(truncated or corrupt\?\)") as raised:
        read_checkpoint(cut)
    assert not isinstance(raised.value, UnsafeCheckpointError)


# --------------------------------------------------------------------------- 2. a full disk


def enospc_save_file(real):
    """A safetensors save_file that leaves half the file, then fails with ENOSPC."""

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save_file


def full_disk_message(path, then="") -> str:
    return rf"no space left on the device while writing {re.escape(str(path))} \(it needs about {SIZE}, {SIZE} free\)" + then


def test_save_checkpoint_failing_partway_raises_disk_full_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / LATEST
    save_checkpoint({"w": torch.randn(256), "epoch": 1}, path)
    before = digest(path)
    monkeypatch.setattr(helper.torch, "save", enospc_torch_save())
    with pytest.raises(DiskFullError, match=f"^{full_disk_message(path)}$") as raised:
        save_checkpoint({"w": torch.randn(256), "epoch": 2}, path)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC and isinstance(raised.value, OSError)
    assert digest(path) == before and read_checkpoint(path)["epoch"] == 1 and leftovers(tmp_path) == []


def test_the_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    path = tmp_path / LATEST
    save_checkpoint({"epoch": 1}, path)
    before = digest(path)
    state = {"w": torch.zeros(1 << 20), "epoch": 2}  # 4 MiB
    usage = SimpleNamespace(total=1 << 30, used=(1 << 30) - 3 * (1 << 20), free=3 * (1 << 20))
    monkeypatch.setattr(files.shutil, "disk_usage", lambda folder: usage)
    monkeypatch.setattr(helper.torch, "save", lambda *a, **k: pytest.fail("wrote although the space was known to be short"))
    with pytest.raises(DiskFullError, match=r"it needs about 5\.\d MiB, 3\.0 MiB free"):
        save_checkpoint(state, path)
    assert digest(path) == before and leftovers(tmp_path) == []
    usage.total = 0  # a file system that reports no sizes: no check, the write goes ahead
    monkeypatch.setattr(helper.torch, "save", REAL_SAVE)
    save_checkpoint(state, path)
    assert read_checkpoint(path)["epoch"] == 2


def test_a_failure_that_is_not_a_full_disk_is_raised_as_it_is(tmp_path, monkeypatch):
    def broken(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise ValueError("something else")

    monkeypatch.setattr(helper.torch, "save", broken)
    with pytest.raises(ValueError, match="^something else$"):
        save_checkpoint({"epoch": 1}, tmp_path / LATEST)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def training_parts():
    """A small encoder, predictor, target, optimizer and schedules, as a run holds them."""
    encoder = vit_tiny(img_size=[32], patch_size=8, depth=1)
    predictor = vit_predictor(num_patches=16, embed_dim=encoder.embed_dim, predictor_embed_dim=96, depth=1, num_heads=encoder.num_heads)
    optimizer, _, lr_schedule, wd_schedule = init_opt(encoder, predictor, 6, 2e-4, 1e-3, 1, 1)
    return (encoder, predictor, copy.deepcopy(encoder)), optimizer, (lr_schedule, wd_schedule, momentum_schedule((0.996, 1.0), 6, 1))


@pytest.fixture
def checkpoints(training_parts, tmp_path):
    """The trainer's checkpoint writer for a run folder in tmp_path."""
    return Checkpointer(tmp_path, tiny_preset(), 0, *training_parts, is_main=True, world_size=1)


def test_the_trainers_checkpoint_names_the_kept_one_and_how_to_resume(checkpoints, monkeypatch):
    monkeypatch.setattr(helper.torch, "save", enospc_torch_save(calls_before=1))
    checkpoints.save(0, 3, 0.5)
    before = digest(checkpoints.latest)
    with pytest.raises(DiskFullError) as raised:
        checkpoints.save(0, 4, 0.5)
    latest = re.escape(str(checkpoints.latest))
    assert re.fullmatch(full_disk_message(checkpoints.latest, rf"; the previous checkpoint {latest} \(epoch 0, step 3\) is kept: "
                                                          rf"free some space, then continue with --resume {latest}"), str(raised.value))
    monkeypatch.undo()
    assert digest(checkpoints.latest) == before and read_checkpoint(checkpoints.latest)["fastjepa"]["itr"] == 3
    assert leftovers(checkpoints.folder) == []


def test_the_numbered_copy_on_a_full_disk_names_the_latest_as_kept(checkpoints, monkeypatch):
    monkeypatch.setattr(helper.torch, "save", enospc_torch_save(calls_before=1))  # the latest is written, its numbered copy fails
    with pytest.raises(DiskFullError) as raised:
        save_epoch_end(checkpoints, CHECKPOINT_FREQ - 1, 0.5)
    numbered, latest = checkpoints.numbered(CHECKPOINT_FREQ), re.escape(str(checkpoints.latest))
    assert re.fullmatch(full_disk_message(numbered, rf"; the previous checkpoint {latest} \(epoch {CHECKPOINT_FREQ}, step 0\) is kept: "
                                                    rf"free some space, then continue with --resume {latest}"), str(raised.value))
    monkeypatch.undo()
    assert not numbered.exists() and read_checkpoint(checkpoints.latest)["epoch"] == CHECKPOINT_FREQ
    assert leftovers(checkpoints.folder) == []


def test_a_first_checkpoint_on_a_full_disk_says_none_was_kept(checkpoints, monkeypatch):
    monkeypatch.setattr(helper.torch, "save", enospc_torch_save())
    with pytest.raises(DiskFullError, match=r"; no checkpoint of this run was written before it: free some space and start again$"):
        checkpoints.save(0, 1, 0.5)
    assert not checkpoints.latest.exists() and leftovers(checkpoints.folder) == []


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    pytest.importorskip("safetensors")
    from fastjepa.weights import export_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "encoder.safetensors"
    export_weights(vit_tiny(img_size=[32], patch_size=8), "safetensors", path)
    return path


@pytest.mark.parametrize("format", ["hf", "timm", "safetensors"])
def test_export_on_a_full_disk_exits_1_in_one_line_keeping_the_previous_export(weights_file, tmp_path, monkeypatch, capsys, format):
    if format == "hf":
        pytest.importorskip("transformers")
    import safetensors.torch

    out = tmp_path / ("hf" if format == "hf" else "w.safetensors")
    argv = ["export", weights_file, "--format", format, "--out", out, "--force"]
    assert run_cli(argv) == 0
    capsys.readouterr()
    before = digest(out)
    monkeypatch.setattr(safetensors.torch, "save_file", enospc_save_file(safetensors.torch.save_file))
    assert run_cli(argv) == 1
    line = one_line(capsys, "export")
    assert re.fullmatch(f"fastjepa export: {full_disk_message(out)}", line), line
    assert digest(out) == before and leftovers(tmp_path) == []


def test_the_eval_feature_cache_on_a_full_disk_names_no_cache(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    import safetensors.torch

    from fastjepa.eval import features as ft
    from fastjepa.eval.datasets import Split

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = Split("random", torch.arange(4) % 2, ["a", "b"], [f"x_{i}.png" for i in range(4)], images=images)
    encoder = vit_tiny(img_size=[32], patch_size=8, depth=1).eval().requires_grad_(False)
    monkeypatch.setattr(safetensors.torch, "save_file", enospc_save_file(safetensors.torch.save_file))
    with pytest.raises(DiskFullError) as raised:
        ft.features(encoder, split, ("last",), 32, cache=tmp_path / "features", progress=False)
    (path,) = {Path(raised.value.path)}
    assert path.parent == tmp_path / "features" and path.suffix == ".safetensors"
    assert re.fullmatch(full_disk_message(path, r"; --no-cache \(cache=None\) evaluates without writing the cache"), str(raised.value))
    assert not path.exists() and leftovers(tmp_path) == []


def test_eval_results_on_a_full_disk_keep_the_previous_file(tmp_path, monkeypatch):
    from fastjepa.eval.results import ProbeResult, write_results

    result = ProbeResult("knn", 0.5, {"k": 10}, [{"k": 10, "heldout_top1": 0.5, "val_top1": 0.5}], 10, 10, 2)
    path = write_results(result, tmp_path / "knn.json")
    before = digest(path)
    real_write_bytes = Path.write_bytes

    def write_half(self, data):
        real_write_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", write_half)
    with pytest.raises(DiskFullError, match=f"^{full_disk_message(path)}$"):
        write_results(result, path, weights="w.pth")
    monkeypatch.undo()
    assert digest(path) == before and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- a real small disk (tmpfs, root only)


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size_mib)``: a fresh tmpfs of that size under tmp_path; unmounted afterwards."""
    mounted = []

    def mount(size_mib: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a real full disk needs root, to mount a small tmpfs")
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mount -t tmpfs does not work here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    try:
        yield mount
    finally:
        for folder in mounted:
            if subprocess.run(["umount", str(folder)]).returncode != 0:
                subprocess.run(["umount", "-l", str(folder)], check=True)


def test_training_on_a_real_full_disk_stops_at_the_second_checkpoint_in_one_line(small_disk, capsys):
    disk = small_disk(150)  # the small run's checkpoint is about 84 MiB: one fits, two do not
    assert run_cli(["train", "--out", disk, "--max-steps", "2", "--checkpoint-every", "1", *SMALL_ARGS]) == 1
    line = one_line(capsys, "train")
    latest = re.escape(str(disk / LATEST))
    assert re.fullmatch(f"fastjepa train: {full_disk_message(disk / LATEST)}; the previous checkpoint {latest} "
                        rf"\(epoch 0, step 1\) is kept: free some space, then continue with --resume {latest}", line), line
    assert read_checkpoint(disk / LATEST)["fastjepa"]["itr"] == 1 and leftovers(disk) == []


def test_a_real_short_write_past_the_check_is_named_a_full_disk(small_disk, monkeypatch):
    """torch's zip writer and safetensors fail in their own words on a full disk; both become DiskFullError."""
    pytest.importorskip("safetensors")
    from fastjepa.weights import export_weights

    disk = small_disk(6)
    path = disk / LATEST
    save_checkpoint({"w": torch.randn(1 << 20)}, path)  # 4 MiB of 6
    before = digest(path)
    monkeypatch.setattr(files, "check_space", lambda path, needed: None)
    with pytest.raises(DiskFullError, match=f"^{full_disk_message(path)}$") as raised:
        save_checkpoint({"w": torch.randn(1 << 20)}, path)
    assert isinstance(raised.value.__cause__, RuntimeError)  # "[enforce fail at inline_container.cc] ... unexpected pos"
    out = disk / "encoder.safetensors"
    with pytest.raises(DiskFullError, match=f"^{full_disk_message(out)}$") as raised:
        export_weights(vit_tiny(img_size=[32], patch_size=8), "safetensors", out)  # about 22 MiB
    assert "No space left on device" in str(raised.value.__cause__)
    assert digest(path) == before and not out.exists() and leftovers(disk) == []


# --------------------------------------------------------------------------- 3. a write killed mid-way

# Writes a checkpoint through save_checkpoint, says so after its first MiB, and waits there to be killed.
PAUSED_WRITER = """
import sys, time, torch
import fastjepa.helper as helper
real_save = torch.save

class Paused:
    def __init__(self, f):
        self.f, self.written = f, 0
    def write(self, data):
        self.written += self.f.write(data)
        if self.written > 1 << 20:
            self.f.flush()
            print("writing", flush=True)
            time.sleep(600)
        return len(data)
    def flush(self):
        self.f.flush()

helper.torch.save = lambda obj, f: real_save(obj, Paused(f))
helper.save_checkpoint({"w": torch.randn(1 << 21), "epoch": 2}, sys.argv[1])
"""


def test_a_write_killed_mid_way_keeps_the_previous_file_and_the_next_write_clears_its_leftover(tmp_path):
    path = tmp_path / LATEST
    save_checkpoint({"w": torch.randn(1 << 10), "epoch": 1}, path)
    before = digest(path)
    writer = subprocess.Popen([sys.executable, "-c", PAUSED_WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n", writer.stderr.read()
        (partial,) = temporary_files(path)
        assert Path(partial).stat().st_size > 1 << 20 and Path(partial).name.startswith(f".{LATEST}.")
        remove_stale(path)  # a live writer's file is not stale
        assert temporary_files(path) == [partial]
    finally:
        writer.kill()
        writer.wait()
    assert digest(path) == before and read_checkpoint(path)["epoch"] == 1
    assert temporary_files(path) == [partial]  # the killed writer could not remove it
    save_checkpoint({"w": torch.randn(1 << 10), "epoch": 3}, path)  # the next write of the same file does
    assert leftovers(tmp_path) == [] and read_checkpoint(path)["epoch"] == 3
