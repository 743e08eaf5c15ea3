"""The plumbing of a training run, which ``fastjepa.train`` drives: the run folder, the CSV and
TensorBoard logs, the preemption notice, checkpoint save and resume, and the summary."""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastjepa.distributed import broadcast_object, full_state
from fastjepa.errors import DiskFullError
from fastjepa.helper import CheckpointError, load_optimizer, save_checkpoint
from fastjepa.step import DIAGNOSTICS

CSV_COLUMNS = ("epoch", "itr", "loss", "mask-A", "mask-B", "time (ms)", "lr", "wd", "momentum", "img/s", *DIAGNOSTICS)
# A run whose last target diagnostics fall below either is named as collapsing in the summary: an effective rank
# under 1.5 means the batch's pooled target features lie along one direction (a normal tiny run measures about 4),
# a std under 1e-4 that they are one point (about 0.3). The predictor's rank starts low and is not judged.
COLLAPSE_RANK = 1.5
COLLAPSE_STD = 1e-4


@dataclass
class TrainResult:
    folder: Path
    steps: int  # optimizer steps taken by this call
    losses: list[float]  # one per step taken by this call
    latest_checkpoint: Path | None
    images_per_second: float
    skipped_images: int  # image files left out: failing the header check at start (once), or a decode (each time met)
    nonfinite_steps: int = 0  # steps left out for a NaN or inf loss or gradient (meta.skip_nonfinite)
    preempted: bool = False  # a preemption notice (on any rank) stopped the run after its checkpoint
    diagnostics: dict | None = None  # the last diagnostics measured (fastjepa.step.DIAGNOSTICS and their "step")


# ---------------------------------------------------------------------------- the run folder


def new_run_folder() -> Path:
    base = Path.cwd() / f"fastjepa-run-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def run_folder(out, resume, configured=None) -> Path:
    """The run's folder, the same on every rank: ``out``, else ``configured`` (the trainer's
    ``logging.folder``), else the folder of the checkpoint resumed from, else a new dated
    folder in the working directory."""
    resume_path = Path(resume) if resume not in (None, "latest", "auto") else None
    if resume_path is not None and not out and not configured and not resume_path.is_file():
        raise CheckpointError(f"checkpoint not found: {resume_path}")  # before its folder would become the run folder
    folder = Path(broadcast_object(str(out or configured or (resume_path.parent if resume_path else new_run_folder()))))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---------------------------------------------------------------------------- the logs


class CSVLog:
    """A run's CSV, its first two columns (epoch from 1, step in the epoch): by default the
    reference's per-rank CSV plus lr, wd, momentum and throughput (``CSV_COLUMNS``); fine-tuning
    gives its own ``columns``. A resumed run appends to it, after dropping the rows of the
    steps it runs again (logged after its checkpoint by the run that stopped), so each step has
    one row."""

    def __init__(self, path: Path, resume_at: tuple[int, int] = (0, 0), columns: tuple[str, ...] = CSV_COLUMNS):
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            self._rewrite(path, resume_at, columns)
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(columns)

    def row(self, *values) -> None:
        self.writer.writerow(values)
        self.file.flush()

    @staticmethod
    def _rewrite(path: Path, resume_at: tuple[int, int], columns: tuple[str, ...]) -> None:
        """Rewrite the CSV (atomically) without the rows of steps at or after ``resume_at``
        ((epoch, itr), epoch counted from 0; the CSV counts from 1, as the reference), and with
        this version's columns when an older run wrote fewer (the new ones blank)."""
        with open(path, newline="") as f:
            rows = list(csv.reader(f))

        def before(row) -> bool:
            try:
                return (int(row[0]) - 1, int(row[1])) < resume_at
            except (ValueError, IndexError):  # the header, or a line that is not a step
                return True

        kept = [row for row in rows if before(row)] if resume_at != (0, 0) else rows
        older = bool(rows) and tuple(rows[0]) != columns and tuple(rows[0]) == columns[:len(rows[0])]
        if older:
            kept = [list(columns)] + [row + [""] * (len(columns) - len(row)) for row in kept[1:]]
        if len(kept) < len(rows) or older:
            partial = path.with_name(path.name + ".partial")
            with open(partial, "w", newline="") as f:
                csv.writer(f).writerows(kept)
            os.replace(partial, path)

    def close(self) -> None:
        self.file.close()


def tensorboard(folder: Path):
    """A TensorBoard writer in ``folder/tensorboard``, or None without tensorboard (optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder / "tensorboard"))


# ---------------------------------------------------------------------------- preemption


class PreemptionNotice:
    """Records SIGTERM or SIGUSR1 (a cluster's preemption notice; SLURM sends one before it
    kills or requeues a job) instead of dying, so the trainer finishes its step, writes the
    checkpoint and returns normally (exit code 0). Only the main thread can install signal
    handlers; elsewhere nothing is installed. ``restore()`` puts the previous handlers back."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self.previous[number] = signal.signal(number, self._record)

    def _record(self, number, frame) -> None:
        self.received = signal.Signals(number).name

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}


# ---------------------------------------------------------------------------- checkpoints


def with_prefix(model: torch.nn.Module) -> dict:
    """A state_dict with DDP's ``module.`` prefix, the reference's checkpoint format."""
    return {f"module.{k}": v for k, v in model.state_dict().items()}


def all_finite(state) -> bool:
    """Whether every floating-point tensor in ``state`` (nested dicts and lists) is finite."""
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(value) for value in state)
    return True


def resolve_resume(resume, resume_preempt: bool, config: dict, folder: Path) -> Path | None:
    """The checkpoint to resume from: ``resume`` (a path, "latest" or "auto"), or the config's
    ``meta.load_checkpoint`` / ``read_checkpoint``; None for a fresh start."""
    if resume is None and (resume_preempt or config["meta"]["load_checkpoint"]):
        resume = config["meta"]["read_checkpoint"] or "latest"
    return checkpoint_to_resume(resume, folder / f"{config['logging']['write_tag']}-latest.pth.tar", folder)


def checkpoint_to_resume(resume, latest: Path, folder: Path) -> Path | None:
    """``resume`` as a checkpoint path: None stays None (a fresh start); "latest" is ``latest``;
    "auto" is ``latest`` when it exists, else None (a requeued job's first start); a relative
    path that does not exist here is taken in the run ``folder``."""
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        return latest if resume == "latest" or latest.exists() else None
    path = Path(resume)
    return path if path.is_absolute() or path.exists() else folder / path


def resume_position(checkpoint: dict, path: Path, optimizer, lr_scheduler, wd_scheduler, momentum_scheduler, ipe: int) -> tuple[int, int]:
    """Load the optimizer and the schedules from ``checkpoint``; the (epoch, itr) to resume at.
    A fastjepa checkpoint resumes at its exact step; a reference checkpoint at the start of
    the epoch after its last, the schedules replayed over the completed epochs."""
    load_optimizer(checkpoint, path, optimizer)
    state = checkpoint.get("fastjepa")
    try:
        if state is not None:
            lr_scheduler.load_state_dict(state["lr_schedule"])
            wd_scheduler.load_state_dict(state["wd_schedule"])
            momentum_scheduler.load_state_dict(state["momentum_schedule"])
            return int(state["epoch"]), int(state["itr"])
        epoch = int(checkpoint["epoch"])
        for _ in range(epoch * ipe):
            lr_scheduler.step(), wd_scheduler.step(), next(momentum_scheduler)
        return epoch, 0
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        entry = "fastjepa" if state is not None else "epoch"
        raise CheckpointError(f"checkpoint {path}: its '{entry}' entry is malformed ({type(e).__name__}: {e})") from e


class Checkpointer:
    """Writes the run's checkpoints: the reference's dict (the three models with DDP's prefix,
    ``opt``, ``epoch``, ...) plus the ``fastjepa`` entry for the exact resume (config, seed,
    step, schedules), atomically (``save_checkpoint``), from rank 0, never with NaN or inf. On a
    full disk its ``DiskFullError`` also names the checkpoint kept (the last one written, or the
    one the run resumed from) and how to continue from it."""

    def __init__(self, folder: Path, config: dict, seed: int, models, optimizer, schedulers, is_main: bool, world_size: int):
        self.folder, self.config, self.seed, self.is_main, self.world_size = folder, config, seed, is_main, world_size
        self.encoder, self.predictor, self.target_encoder = models
        self.optimizer, self.schedulers = optimizer, schedulers  # (lr, wd, momentum)
        self.tag = config["logging"]["write_tag"]
        self.latest = folder / f"{self.tag}-latest.pth.tar"
        self.kept: tuple[Path, int, int] | None = None  # (path, epoch, itr) of the last checkpoint written or resumed from

    def numbered(self, epoch: int) -> Path:
        return self.folder / f"{self.tag}-ep{epoch}.pth.tar"

    def save(self, epoch: int, itr: int, loss_avg: float, path: Path | None = None) -> None:
        """The checkpoint at (epoch, itr) to ``path`` (default: the latest). Every rank calls
        it: gathering FSDP2 shards is a collective."""
        path = path or self.latest
        state = full_state({"encoder": with_prefix(self.encoder), "predictor": with_prefix(self.predictor),
                            "target_encoder": with_prefix(self.target_encoder), "opt": self.optimizer.state_dict()})
        if not all_finite(state):  # the same verdict on every rank: the state is whole everywhere
            raise FloatingPointError(f"not writing checkpoint {path}: the weights or optimizer state hold NaN or inf "
                                     f"(epoch {epoch + 1}, step {itr}); the previous checkpoint is kept")
        if not self.is_main:
            return
        data, optimization = self.config["data"], self.config["optimization"]
        lr_scheduler, wd_scheduler, momentum_scheduler = self.schedulers
        try:
            save_checkpoint({
                **state, "scaler": None, "epoch": epoch, "loss": loss_avg,
                "batch_size": data["batch_size"], "world_size": self.world_size, "lr": optimization["lr"],
                "fastjepa": {"config": self.config, "seed": self.seed, "epoch": epoch, "itr": itr,
                             "lr_schedule": lr_scheduler.state_dict(), "wd_schedule": wd_scheduler.state_dict(),
                             "momentum_schedule": momentum_scheduler.state_dict()},
            }, path)
        except DiskFullError as e:
            raise DiskFullError(e.path, e.needed, e.free, self.kept_text()) from e
        self.kept = (path, epoch, itr)

    def kept_text(self) -> str:
        """What a failed write leaves to continue from, in words."""
        if self.kept is None:
            return "no checkpoint of this run was written before it: free some space and start again"
        path, epoch, itr = self.kept
        return f"the previous checkpoint {path} (epoch {epoch}, step {itr}) is kept: free some space, then continue with --resume {path}"


# ---------------------------------------------------------------------------- the summary


def print_summary(result: TrainResult, elapsed: float) -> None:
    losses = result.losses
    head = sum(losses[:10]) / max(len(losses[:10]), 1)
    tail = sum(losses[-10:]) / max(len(losses[-10:]), 1)
    lines = [
        f"done: {result.steps} steps in {elapsed:.0f} s, {result.images_per_second:.1f} img/s",
        f"loss: {head:.4f} (first 10 steps) -> {tail:.4f} (last 10 steps)" if losses else "loss: no step taken",
    ]
    if result.diagnostics is not None:
        lines += diagnostics_lines(result.diagnostics)
    if result.nonfinite_steps:
        lines.append(f"steps skipped for a non-finite loss or gradient: {result.nonfinite_steps}")
    if result.skipped_images:
        lines.append(f"unreadable images skipped: {result.skipped_images}")
    if result.latest_checkpoint is not None:
        lines.append(f"checkpoint: {result.latest_checkpoint}")
    lines += [f"output folder: {result.folder}", f"curves: fastjepa plot {result.folder}"]
    print("\n".join(lines))


def collapse(diagnostics: dict) -> str | None:
    """Why these diagnostics say the representations collapsed, or None."""
    reasons = [f"{name} {diagnostics[name]:.3g} < {limit:g}" for name, limit in
               (("target_rank", COLLAPSE_RANK), ("target_std", COLLAPSE_STD)) if diagnostics[name] < limit]
    return "; ".join(reasons) or None


def diagnostics_lines(diagnostics: dict) -> list[str]:
    measured = ", ".join(f"{name} {diagnostics[name]:.4g}" for name in DIAGNOSTICS)
    lines = [f"diagnostics at step {diagnostics['step']}: {measured}"]
    reason = collapse(diagnostics)
    if reason:
        lines.append(f"COLLAPSE: {reason} (the features no longer tell the images apart; see the README's 'Smaller machines')")
    return lines
