"""I-JEPA training: the step (shared with the benchmarks) and the trainer, ``main(config)`` as in
the reference and ``fit(**keys)`` in one call."""

from __future__ import annotations

import copy
import csv
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from fastjepa.config import ConfigError, find_key, tiny_preset, validate
from fastjepa.data.loader import make_loader
from fastjepa.helper import init_model, init_opt, load_checkpoint, read_checkpoint, save_checkpoint
from fastjepa.masks.utils import PackedMasks, _as_list, stack_masks
from fastjepa.models.shadow import Bf16Shadow
from fastjepa.ops import ema_update_, gather_tokens
from fastjepa.profiling import StepProfiler
from fastjepa.utils.schedulers import momentum_schedule
from fastjepa.utils.tensors import repeat_interleave_batch


@dataclass
class StepResult:
    loss: torch.Tensor  # 0-d, detached, still on the device: reading it is the caller's sync
    lr: float
    wd: float
    momentum: float


@torch.no_grad()
def target_tokens(target_encoder, imgs, num_context_masks: int, masks_pred: Sequence[torch.Tensor]) -> torch.Tensor:
    """The targets: the target encoder's output after a LayerNorm without affine (eps 1e-5),
    gathered at every target block and repeated once per context mask (mask-major)."""
    h = target_encoder(imgs)
    h = F.layer_norm(h, (h.size(-1),))
    B = len(imgs)
    target_index = repeat_interleave_batch(stack_masks(masks_pred, B), B, repeat=num_context_masks)
    return gather_tokens(h, target_index.to(h.device))


def update_target(target_encoder, encoder, momentum: float, target_shadow: Bf16Shadow | None = None) -> None:
    """The EMA of the encoder into the target encoder (and its bf16 shadow, when there is one)."""
    if target_shadow is not None:
        target_shadow.update_(momentum)
    else:
        ema_update_(list(target_encoder.parameters()), list(encoder.parameters()), momentum)


def jepa_loss(encoder, predictor, target_encoder, imgs, masks_enc: Sequence[torch.Tensor | PackedMasks], masks_pred: Sequence[torch.Tensor],
              shared_context_predictor: bool = False) -> torch.Tensor:
    """Smooth-L1 (beta 1, mean) between the predictor's output and the target
    encoder's output after a LayerNorm without affine (eps 1e-5), at the target blocks.

    ``masks_enc`` may be ``PackedMasks`` (``mask.ragged``: every context token kept, the
    encoder and predictor run on packed tokens); ``shared_context_predictor`` runs the
    predictor's shared-context layout (``meta.shared_context_predictor``). The target
    masks and the loss are the same in every mode."""
    masks_enc = _as_list(masks_enc)
    h = target_tokens(target_encoder, imgs, len(masks_enc), masks_pred)
    extra = {"shared_context": True} if shared_context_predictor else {}  # a reference predictor takes no such keyword
    z = predictor(encoder(imgs, masks_enc), masks_enc, masks_pred, **extra)
    dtype = torch.promote_types(z.dtype, torch.float32)  # fp32 under bf16 autocast, fp64 stays fp64
    return F.smooth_l1_loss(z.to(dtype), h.to(dtype))


def train_step(
    encoder,
    predictor,
    target_encoder,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    wd_scheduler,
    momentum_scheduler: Iterator[float],
    imgs: torch.Tensor,
    masks_enc: Sequence[torch.Tensor],
    masks_pred: Sequence[torch.Tensor],
    use_bfloat16: bool = False,
    target_shadow: Bf16Shadow | None = None,
    shared_context_predictor: bool = False,
) -> StepResult:
    """One I-JEPA iteration in the reference's order: schedules, forward under bf16
    autocast (when asked), loss, backward, optimizer step, zero_grad, EMA. With a
    ``target_shadow`` (bf16 autocast only) the target forward runs on the shadow, and the
    EMA refreshes it: the same values, without autocast's per-forward weight casts.
    ``masks_enc`` and ``shared_context_predictor``: see ``jepa_loss``."""
    if target_shadow is not None and not use_bfloat16:
        raise ValueError("train_step: target_shadow holds bf16 weights and needs use_bfloat16=True")
    lr = lr_scheduler.step()
    wd = wd_scheduler.step()
    with torch.autocast(device_type=imgs.device.type, dtype=torch.bfloat16, enabled=use_bfloat16):
        target_forward = target_shadow.module if target_shadow is not None else target_encoder
        loss = jepa_loss(encoder, predictor, target_forward, imgs, masks_enc, masks_pred, shared_context_predictor)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    momentum = next(momentum_scheduler)
    update_target(target_encoder, encoder, momentum, target_shadow)
    return StepResult(loss.detach(), lr, wd, momentum)


# ---------------------------------------------------------------------------- the trainer

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
    """The reference's per-rank CSV plus lr, wd, momentum and throughput; appends on resume."""

    def __init__(self, path: Path):
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(CSV_COLUMNS)

    def row(self, *values) -> None:
        self.writer.writerow(values)
        self.file.flush()

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
         profile_steps: tuple[int, int] | None = None, torch_profiler: str | None = None) -> TrainResult:
    """Pretrain I-JEPA as the reference's ``src.train.main`` does, from a config dict of
    the reference's YAML schema. ``resume``: a checkpoint path, "latest" (in the run
    folder) or "auto" (latest when it exists, else a fresh start: for requeued jobs).
    ``max_steps`` stops early (after writing a checkpoint). SIGTERM or SIGUSR1 (a cluster's
    preemption notice) finishes the current step, writes the checkpoint and returns."""
    config = validate(args)
    device = torch.device(device) if device is not None else default_device()
    data, mask, meta, opt_cfg = config["data"], config["mask"], config["meta"], config["optimization"]
    tag = config["logging"]["write_tag"]
    resume_path = Path(resume) if resume not in (None, "latest", "auto") else None
    folder = Path(out or config["logging"]["folder"] or (resume_path.parent if resume_path else new_run_folder()))
    folder.mkdir(parents=True, exist_ok=True)
    config["logging"]["folder"] = str(folder)
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")

    loader = make_loader(config, device, seed, data_root(config))
    ipe = loader.steps_per_epoch

    torch.manual_seed(seed)
    encoder, predictor = init_model(device, mask["patch_size"], meta["model_name"], data["crop_size"], meta["pred_depth"], meta["pred_emb_dim"])
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    optimizer, _, lr_scheduler, wd_scheduler = init_opt(
        encoder, predictor, ipe, opt_cfg["start_lr"], opt_cfg["lr"], opt_cfg["warmup"], opt_cfg["epochs"],
        opt_cfg["weight_decay"], opt_cfg["final_weight_decay"], opt_cfg["final_lr"], meta["use_bfloat16"], opt_cfg["ipe_scale"])
    momentum_scheduler = momentum_schedule(opt_cfg["ema"], ipe, opt_cfg["epochs"], opt_cfg["ipe_scale"])

    start_epoch, start_itr = 0, 0
    checkpoint_path = _resolve_resume(resume, resume_preempt, config, folder)
    if checkpoint_path is not None:
        encoder, predictor, target_encoder, optimizer, _, start_epoch = load_checkpoint(
            device, checkpoint_path, encoder, predictor, target_encoder, optimizer, None)
        state = read_checkpoint(checkpoint_path).get("fastjepa")
        if state is not None:  # a fastjepa checkpoint: resume at the exact step
            start_epoch, start_itr = state["epoch"], state["itr"]
            lr_scheduler.load_state_dict(state["lr_schedule"])
            wd_scheduler.load_state_dict(state["wd_schedule"])
            momentum_scheduler.load_state_dict(state["momentum_schedule"])
        else:  # a reference checkpoint: replay the schedules over the completed epochs
            for _ in range(start_epoch * ipe):
                lr_scheduler.step(), wd_scheduler.step(), next(momentum_scheduler)
        print(f"resumed from {checkpoint_path} at epoch {start_epoch}, step {start_itr} of {ipe}")

    # bf16 copies of the target's matmul weights for its forwards, refreshed by the EMA
    target_shadow = Bf16Shadow(target_encoder, encoder) if meta["use_bfloat16"] else None

    with open(folder / "params-ijepa.yaml", "w") as f:
        yaml.dump(config, f)
    log = CSVLog(folder / f"{tag}_r0.csv")
    board = _tensorboard(folder)
    latest = folder / f"{tag}-latest.pth.tar"

    def save(epoch: int, itr: int, loss_avg: float, path: Path = latest) -> None:
        save_checkpoint({
            "encoder": _with_prefix(encoder), "predictor": _with_prefix(predictor), "target_encoder": _with_prefix(target_encoder),
            "opt": optimizer.state_dict(), "scaler": None, "epoch": epoch, "loss": loss_avg,
            "batch_size": data["batch_size"], "world_size": 1, "lr": opt_cfg["lr"],
            "fastjepa": {"config": config, "seed": seed, "epoch": epoch, "itr": itr,
                         "lr_schedule": lr_scheduler.state_dict(), "wd_schedule": wd_scheduler.state_dict(),
                         "momentum_schedule": momentum_scheduler.state_dict()},
        }, path)

    total_steps = opt_cfg["epochs"] * ipe
    first_step = start_epoch * ipe + start_itr
    if max_steps is not None:
        total_steps = min(total_steps, first_step + max_steps)
    print(f"fastjepa train: {meta['model_name']} on {device.type}, {loader.num_images} images x{data['repeat']} "
          f"({ipe} steps per epoch, data backend {loader.backend}), output folder: {folder}")
    if loader.skipped_files:
        print(f"skipping {len(loader.skipped_files)} files that are not images (e.g. {loader.skipped_files[0]})")

    losses, skipped, images_seen, saved = [], len(loader.rejected), 0, None
    step = first_step
    profiler = StepProfiler(device, profile_steps, torch_profiler)
    preemption = PreemptionNotice()
    bar = tqdm(total=total_steps, initial=first_step, unit="step", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for epoch in range(start_epoch, opt_cfg["epochs"]):
            if step >= total_steps or preemption.received:
                break
            first_itr = start_itr if epoch == start_epoch else 0
            epoch_losses = []
            tick = time.perf_counter()
            # images normalised on the device; masks drawn one step ahead, seeded by (seed, step)
            for itr, (images, masks_enc, masks_pred, bad) in enumerate(loader.epoch(epoch, first_itr, step), start=first_itr):
                skipped += bad
                if len(images) == 0:
                    continue
                with profiler.step(step):
                    result = train_step(encoder, predictor, target_encoder, optimizer, lr_scheduler, wd_scheduler,
                                        momentum_scheduler, images, masks_enc, masks_pred, meta["use_bfloat16"], target_shadow,
                                        meta["shared_context_predictor"])
                    loss = result.loss.item()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at epoch {epoch + 1}, step {itr} (global step {step}); "
                                             f"stopping without writing a checkpoint from this state")
                now = time.perf_counter()
                step_ms, throughput = (now - tick) * 1e3, len(images) / (now - tick)
                tick = now
                log.row(epoch + 1, itr, f"{loss:.5f}", context_length(masks_enc[0]), masks_pred[0].shape[1], f"{step_ms:.1f}",
                        f"{result.lr:.6g}", f"{result.wd:.6g}", f"{result.momentum:.6g}", f"{throughput:.2f}")
                if board is not None:
                    for name, value in (("loss", loss), ("lr", result.lr), ("wd", result.wd), ("momentum", result.momentum), ("img_per_s", throughput)):
                        board.add_scalar(name, value, step)
                losses.append(loss)
                epoch_losses.append(loss)
                images_seen += len(images)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{result.lr:.2e}", img_s=f"{throughput:.1f}", refresh=False)
                stop, mid_epoch = step >= total_steps or preemption.received, itr + 1 < ipe  # the epoch's end saves below
                if mid_epoch and (stop or (checkpoint_every is not None and step % checkpoint_every == 0)):
                    save(epoch, itr + 1, sum(epoch_losses) / len(epoch_losses))
                    saved = latest
                if stop and mid_epoch:
                    break
            else:  # the epoch ran to its end
                average = sum(epoch_losses) / max(len(epoch_losses), 1)
                save(epoch + 1, 0, average)
                saved = latest
                if (epoch + 1) % CHECKPOINT_FREQ == 0:
                    save(epoch + 1, 0, average, folder / f"{tag}-ep{epoch + 1}.pth.tar")
    except KeyboardInterrupt:
        bar.close()
        last = latest if latest.exists() else "none written yet"
        print(f"\ninterrupted at step {step}; the last complete checkpoint: {last}")
        raise
    finally:
        preemption.restore()
        bar.close()
        profiler.close(step)
        log.close()
        if board is not None:
            board.close()

    if preemption.received:
        print(f"\n{preemption.received} received: stopped after step {step} with the checkpoint {latest}; "
              f"continue with --resume auto (or resume='auto')")
    elapsed = time.perf_counter() - started
    result = TrainResult(folder, len(losses), losses, saved, images_seen / elapsed if elapsed > 0 else 0.0, skipped)
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
    if result.skipped_images:
        lines.append(f"unreadable images skipped: {result.skipped_images}")
    if result.latest_checkpoint is not None:
        lines.append(f"checkpoint: {result.latest_checkpoint}")
    lines += [f"output folder: {result.folder}", f"curves: fastjepa plot {result.folder}"]
    print("\n".join(lines))


TRAIN_OPTIONS = ("device", "out", "max_steps", "seed", "resume", "checkpoint_every", "progress", "profile_steps", "torch_profiler")


def fit(**keys) -> TrainResult:
    """One call: the tiny preset with any config key overridden by name (``fit(model_name="vit_small",
    epochs=3, root_path="/data/photos")``) plus the trainer's options (device, out, max_steps, seed,
    resume, checkpoint_every, progress, profile_steps, torch_profiler)."""
    options = {name: keys.pop(name) for name in TRAIN_OPTIONS if name in keys}
    config = tiny_preset()
    for name, value in keys.items():
        config[find_key(name)][name] = value
    return main(config, **options)
