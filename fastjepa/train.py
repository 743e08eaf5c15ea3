"""The I-JEPA trainer: ``main(config)`` as in the reference and ``fit(**keys)`` in one call. The
step it runs is ``fastjepa.step.train_step`` (importable from here too, as before)."""

from __future__ import annotations

import copy
import csv
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import yaml
from tqdm import tqdm

from fastjepa.config import ConfigError, build_loader, find_key, tiny_preset, validate
from fastjepa.distributed import all_gather_object, any_rank, broadcast_object, full_state, rank, setup, teardown, world_size, wrap
from fastjepa.helper import CheckpointError, init_model, init_opt, load_models, load_optimizer, read_checkpoint, save_checkpoint
from fastjepa.masks.utils import PackedMasks
from fastjepa.models.shadow import Bf16Shadow
from fastjepa.profiling import StepProfiler
from fastjepa.step import ContextPredictor, train_step
from fastjepa.utils.schedulers import momentum_schedule

CHECKPOINT_FREQ = 50  # epochs between numbered checkpoint copies, as in the reference
CSV_COLUMNS = ("epoch", "itr", "loss", "mask-A", "mask-B", "time (ms)", "lr", "wd", "momentum", "img/s")


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


def context_length(mask: torch.Tensor | PackedMasks) -> int:
    """The CSV's mask-A: the context length K of a dense (B, K) mask; with ``mask.ragged``,
    the mean context length over the batch, rounded to an int (``fastjepa plot`` reads
    mask-A as an integer). Host numbers only: no device sync."""
    if isinstance(mask, PackedMasks):
        return round(sum(mask.lengths) / mask.rows)
    return mask.shape[1]


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


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def data_root(config: dict) -> str:
    """``root_path/image_folder/train`` when it exists (the reference's ImageNet layout),
    else ``root_path/image_folder`` itself: any folder of images."""
    root = os.path.join(config["data"]["root_path"], config["data"]["image_folder"])
    train = os.path.join(root, "train")
    return train if os.path.isdir(train) else root


def new_run_folder() -> Path:
    base = Path.cwd() / f"fastjepa-run-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


class CSVLog:
    """The reference's per-rank CSV plus lr, wd, momentum and throughput. A resumed run
    appends to it, after dropping the rows of the steps it runs again (logged after its
    checkpoint by the run that stopped), so each step has one row."""

    def __init__(self, path: Path, resume_at: tuple[int, int] = (0, 0)):
        new = not path.exists() or path.stat().st_size == 0
        if not new and resume_at != (0, 0):
            self._drop_rows_from(path, resume_at)
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(CSV_COLUMNS)

    def row(self, *values) -> None:
        self.writer.writerow(values)
        self.file.flush()

    @staticmethod
    def _drop_rows_from(path: Path, resume_at: tuple[int, int]) -> None:
        """Rewrite the CSV (atomically) without the rows of steps at or after ``resume_at``
        ((epoch, itr), epoch counted from 0; the CSV counts from 1, as the reference)."""
        with open(path, newline="") as f:
            rows = list(csv.reader(f))

        def before(row) -> bool:
            try:
                return (int(row[0]) - 1, int(row[1])) < resume_at
            except (ValueError, IndexError):  # the header, or a line that is not a step
                return True

        kept = [row for row in rows if before(row)]
        if len(kept) < len(rows):
            partial = path.with_name(path.name + ".partial")
            with open(partial, "w", newline="") as f:
                csv.writer(f).writerows(kept)
            os.replace(partial, path)

    def close(self) -> None:
        self.file.close()


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(folder / "tensorboard"))


def _with_prefix(model: torch.nn.Module) -> dict:
    """A state_dict with DDP's ``module.`` prefix, the reference's checkpoint format."""
    return {f"module.{k}": v for k, v in model.state_dict().items()}


def _resolve_resume(resume, resume_preempt: bool, config: dict, folder: Path) -> Path | None:
    if resume is None and (resume_preempt or config["meta"]["load_checkpoint"]):
        resume = config["meta"]["read_checkpoint"] or "latest"
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        latest = folder / f"{config['logging']['write_tag']}-latest.pth.tar"
        return latest if resume == "latest" or latest.exists() else None  # auto: a fresh start when none exists
    path = Path(resume)
    return path if path.is_absolute() or path.exists() else folder / path


def main(args: dict, resume_preempt: bool = False, *, device=None, out=None, max_steps: int | None = None, seed: int = 0,
         resume: str | None = None, checkpoint_every: int | None = None, progress: bool = True,
         profile_steps: tuple[int, int] | None = None, torch_profiler: str | None = None,
         profile_ranks: Sequence[int] | None = (0,)) -> TrainResult:
    """Pretrain I-JEPA as the reference's ``src.train.main`` does, from a config dict of
    the reference's YAML schema. ``resume``: a checkpoint path, "latest" (in the run
    folder) or "auto" (latest when it exists, else a fresh start: for requeued jobs).
    ``max_steps`` stops early (after writing a checkpoint). SIGTERM or SIGUSR1 (a cluster's
    preemption notice) finishes the current step, writes the checkpoint and returns.
    Under torchrun or srun every process runs this (see ``fastjepa.distributed``);
    ``profile_ranks``: the ranks that profile (None: all)."""
    config = validate(args)
    device, started_group = setup(device)
    try:
        return _train(config, resume_preempt, device, out, max_steps, seed, resume, checkpoint_every, progress,
                      profile_steps if profile_ranks is None or rank() in profile_ranks else None,
                      torch_profiler if profile_ranks is None or rank() in profile_ranks else None)
    finally:
        if started_group:
            teardown()


def all_finite(state) -> bool:
    """Whether every floating-point tensor in ``state`` (nested dicts and lists) is finite."""
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(value) for value in state)
    return True


def _train(config, resume_preempt, device, out, max_steps, seed, resume, checkpoint_every, progress, profile_steps, torch_profiler):
    data, mask, meta, opt_cfg = config["data"], config["mask"], config["meta"], config["optimization"]
    tag = config["logging"]["write_tag"]
    this_rank, ranks = rank(), world_size()
    is_main = this_rank == 0
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    resume_path = Path(resume) if resume not in (None, "latest", "auto") else None
    if resume_path is not None and not out and not config["logging"]["folder"] and not resume_path.is_file():
        raise CheckpointError(f"checkpoint not found: {resume_path}")  # before its folder would become the run folder
    folder = Path(broadcast_object(str(out or config["logging"]["folder"] or (resume_path.parent if resume_path else new_run_folder()))))
    folder.mkdir(parents=True, exist_ok=True)
    config["logging"]["folder"] = str(folder)
    say = print if is_main else (lambda *a, **k: None)

    loader = build_loader(config, device, seed, data_root(config), this_rank, ranks, all_gather_object)
    ipe = loader.steps_per_epoch

    torch.manual_seed(seed)
    encoder, predictor = init_model(device, mask["patch_size"], meta["model_name"], data["crop_size"], meta["pred_depth"], meta["pred_emb_dim"])
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    checkpoint_path = _resolve_resume(resume, resume_preempt, config, folder)
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint is not None:  # into the whole models, before DDP or FSDP2 take them
        load_models(checkpoint, checkpoint_path, encoder, predictor, target_encoder)
    model = wrap(ContextPredictor(encoder, predictor, meta["shared_context_predictor"]), target_encoder, meta, device)
    optimizer, _, lr_scheduler, wd_scheduler = init_opt(
        encoder, predictor, ipe, opt_cfg["start_lr"], opt_cfg["lr"], opt_cfg["warmup"], opt_cfg["epochs"],
        opt_cfg["weight_decay"], opt_cfg["final_weight_decay"], opt_cfg["final_lr"], meta["use_bfloat16"], opt_cfg["ipe_scale"])
    momentum_scheduler = momentum_schedule(opt_cfg["ema"], ipe, opt_cfg["epochs"], opt_cfg["ipe_scale"])

    start_epoch, start_itr = 0, 0
    if checkpoint is not None:
        load_optimizer(checkpoint, checkpoint_path, optimizer)
        state = checkpoint.get("fastjepa")
        try:
            if state is not None:  # a fastjepa checkpoint: resume at the exact step
                start_epoch, start_itr = int(state["epoch"]), int(state["itr"])
                lr_scheduler.load_state_dict(state["lr_schedule"])
                wd_scheduler.load_state_dict(state["wd_schedule"])
                momentum_scheduler.load_state_dict(state["momentum_schedule"])
            else:  # a reference checkpoint: replay the schedules over the completed epochs
                start_epoch = int(checkpoint["epoch"])
                for _ in range(start_epoch * ipe):
                    lr_scheduler.step(), wd_scheduler.step(), next(momentum_scheduler)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            entry = "fastjepa" if state is not None else "epoch"
            raise CheckpointError(f"checkpoint {checkpoint_path}: its '{entry}' entry is malformed ({type(e).__name__}: {e})") from e
        say(f"resumed from {checkpoint_path} at epoch {start_epoch}, step {start_itr} of {ipe}")
        del checkpoint

    # bf16 copies of the target's matmul weights for its forwards, refreshed by the EMA (whole tensors only: not under FSDP2)
    sharded = ranks > 1 and meta["sharding"] == "fsdp"
    target_shadow = Bf16Shadow(target_encoder, encoder) if meta["use_bfloat16"] and not sharded else None

    if is_main:
        with open(folder / "params-ijepa.yaml", "w") as f:
            yaml.dump(config, f)
    log = CSVLog(folder / f"{tag}_r{this_rank}.csv", (start_epoch, start_itr))
    board = _tensorboard(folder) if is_main else None
    latest = folder / f"{tag}-latest.pth.tar"

    def save(epoch: int, itr: int, loss_avg: float, path: Path = latest) -> None:
        state = full_state({
            "encoder": _with_prefix(encoder), "predictor": _with_prefix(predictor), "target_encoder": _with_prefix(target_encoder),
            "opt": optimizer.state_dict(),
        })  # every rank: gathering FSDP2 shards is a collective
        if not all_finite(state):  # the same verdict on every rank: the state is whole everywhere
            raise FloatingPointError(f"not writing checkpoint {path}: the weights or optimizer state hold NaN or inf "
                                     f"(epoch {epoch + 1}, step {itr}); the previous checkpoint is kept")
        if not is_main:
            return
        save_checkpoint({
            **state, "scaler": None, "epoch": epoch, "loss": loss_avg,
            "batch_size": data["batch_size"], "world_size": ranks, "lr": opt_cfg["lr"],
            "fastjepa": {"config": config, "seed": seed, "epoch": epoch, "itr": itr,
                         "lr_schedule": lr_scheduler.state_dict(), "wd_schedule": wd_scheduler.state_dict(),
                         "momentum_schedule": momentum_scheduler.state_dict()},
        }, path)

    total_steps = opt_cfg["epochs"] * ipe
    first_step = start_epoch * ipe + start_itr
    if max_steps is not None:
        total_steps = min(total_steps, first_step + max_steps)
    processes = f" x {ranks} processes ({meta['sharding']})" if ranks > 1 else ""
    say(f"fastjepa train: {meta['model_name']} on {device.type}{processes}, {loader.num_images} images x{data['repeat']} "
        f"({ipe} steps per epoch, data backend {loader.backend}), output folder: {folder}")
    if loader.skipped_files:
        say(f"skipping {len(loader.skipped_files)} files that are not images (e.g. {loader.skipped_files[0]})")

    losses, skipped, images_seen, saved, nonfinite_steps = [], len(loader.rejected), 0, None, 0
    step = first_step
    profiler = StepProfiler(device, profile_steps, torch_profiler)
    preemption = PreemptionNotice()
    preempted = False  # agreed by every rank: a notice reached any of them
    bar = tqdm(total=total_steps, initial=first_step, unit="step", disable=not (progress and is_main), dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for epoch in range(start_epoch, opt_cfg["epochs"]):
            (preempted,) = any_rank(preemption.received is not None, device=device)
            if step >= total_steps or preempted:
                break
            first_itr = start_itr if epoch == start_epoch else 0
            epoch_losses = []
            tick = time.perf_counter()
            # images normalised on the device; masks drawn one step ahead, seeded by (seed, step, rank)
            for itr, (images, masks_enc, masks_pred, bad) in enumerate(loader.epoch(epoch, first_itr, step), start=first_itr):
                skipped += bad
                empty, preempted = any_rank(len(images) == 0, preemption.received is not None, device=device)
                if preempted:  # the notice came during the previous step: keep it, stop before this one
                    save(epoch, itr, sum(epoch_losses) / max(len(epoch_losses), 1))
                    saved = latest
                    break
                if empty:  # no file of this batch decoded on some rank: every rank leaves the step out
                    continue
                with profiler.step(step):
                    result = train_step(model, target_encoder, optimizer, lr_scheduler, wd_scheduler, momentum_scheduler,
                                        images, masks_enc, masks_pred, meta["use_bfloat16"], target_shadow)
                loss = result.loss_value  # read before the optimizer step: the host runs ahead into the next step
                now = time.perf_counter()
                step_ms, throughput = (now - tick) * 1e3, len(images) / (now - tick)
                tick = now
                if result.nonfinite is not None:
                    where = f"epoch {epoch + 1}, step {itr} (global step {step})"
                    if not meta["skip_nonfinite"]:
                        raise FloatingPointError(f"{result.nonfinite} at {where}; stopping without an update or a checkpoint "
                                                 f"from this step (meta.skip_nonfinite: true skips such steps instead)")
                    nonfinite_steps += 1
                    if is_main:
                        tqdm.write(f"skipped {where}: {result.nonfinite}")
                else:
                    log.row(epoch + 1, itr, f"{loss:.5f}", context_length(masks_enc[0]), masks_pred[0].shape[1], f"{step_ms:.1f}",
                            f"{result.lr:.6g}", f"{result.wd:.6g}", f"{result.momentum:.6g}", f"{throughput:.2f}")
                    if board is not None:
                        for name, value in (("loss", loss), ("lr", result.lr), ("wd", result.wd), ("momentum", result.momentum), ("img_per_s", throughput)):
                            board.add_scalar(name, value, step)
                    losses.append(loss)
                    epoch_losses.append(loss)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{result.lr:.2e}", img_s=f"{throughput:.1f}", refresh=False)
                images_seen += len(images)
                step += 1
                bar.update(1)
                stop, mid_epoch = step >= total_steps, itr + 1 < ipe  # the epoch's end saves below
                if mid_epoch and (stop or (checkpoint_every is not None and step % checkpoint_every == 0)):
                    save(epoch, itr + 1, sum(epoch_losses) / max(len(epoch_losses), 1))
                    saved = latest
                if stop and mid_epoch:
                    break
            else:  # the epoch ran to its end
                average = sum(epoch_losses) / max(len(epoch_losses), 1)
                save(epoch + 1, 0, average)
                saved = latest
                if (epoch + 1) % CHECKPOINT_FREQ == 0:
                    save(epoch + 1, 0, average, folder / f"{tag}-ep{epoch + 1}.pth.tar")
                continue
            break  # the inner loop stopped early: max_steps or a preemption notice
    except KeyboardInterrupt:
        bar.close()
        last = latest if latest.exists() else "none written yet"
        say(f"\ninterrupted at step {step}; the last complete checkpoint: {last}")
        raise
    finally:
        preemption.restore()
        bar.close()
        profiler.close(step)
        log.close()
        if board is not None:
            board.close()

    if preempted:
        say(f"\n{preemption.received or 'a preemption notice (on another rank)'} received: stopped after step {step} "
            f"with the checkpoint {latest}; continue with --resume auto (or resume='auto')")
    elapsed = time.perf_counter() - started
    result = TrainResult(folder, len(losses), losses, saved, images_seen / elapsed if elapsed > 0 else 0.0, skipped, nonfinite_steps,
                         preempted)
    if is_main:
        _print_summary(result, elapsed)
    return result


def _print_summary(result: TrainResult, elapsed: float) -> None:
    losses = result.losses
    head = sum(losses[:10]) / max(len(losses[:10]), 1)
    tail = sum(losses[-10:]) / max(len(losses[-10:]), 1)
    lines = [
        f"done: {result.steps} steps in {elapsed:.0f} s, {result.images_per_second:.1f} img/s",
        f"loss: {head:.4f} (first 10 steps) -> {tail:.4f} (last 10 steps)" if losses else "loss: no step taken",
    ]
    if result.nonfinite_steps:
        lines.append(f"steps skipped for a non-finite loss or gradient: {result.nonfinite_steps}")
    if result.skipped_images:
        lines.append(f"unreadable images skipped: {result.skipped_images}")
    if result.latest_checkpoint is not None:
        lines.append(f"checkpoint: {result.latest_checkpoint}")
    lines += [f"output folder: {result.folder}", f"curves: fastjepa plot {result.folder}"]
    print("\n".join(lines))


TRAIN_OPTIONS = ("device", "out", "max_steps", "seed", "resume", "checkpoint_every", "progress", "profile_steps", "torch_profiler",
                 "profile_ranks")


def fit(**keys) -> TrainResult:
    """One call: the tiny preset with any config key overridden by name (``fit(model_name="vit_small",
    epochs=3, root_path="/data/photos")``) plus the trainer's options (device, out, max_steps, seed,
    resume, checkpoint_every, progress, profile_steps, torch_profiler, profile_ranks)."""
    options = {name: keys.pop(name) for name in TRAIN_OPTIONS if name in keys}
    config = tiny_preset()
    for name, value in keys.items():
        config[find_key(name)][name] = value
    return main(config, **options)
