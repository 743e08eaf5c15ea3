"""The I-JEPA trainer: ``main(config)`` as in the reference and ``fit(**keys)`` in one call. The
step it runs is ``fastjepa.step.train_step`` (importable from here too, as before); the run's
plumbing (folder, logs, preemption, checkpoints, summary) is ``fastjepa.run``."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import yaml
from tqdm import tqdm

from fastjepa.config import ConfigError, build_loader, find_key, tiny_preset, validate
from fastjepa.data.base import ImageLoader
from fastjepa.distributed import all_gather_object, any_rank, rank, setup, teardown, world_size, wrap
from fastjepa.helper import init_model, init_opt, load_models, read_checkpoint
from fastjepa.models.shadow import Bf16Shadow
from fastjepa.models.vision_transformer import compile_blocks
from fastjepa.ops.backend import device_problem
from fastjepa.profiling import StepProfiler
from fastjepa.run import (
    CSV_COLUMNS,
    Checkpointer,
    CSVLog,
    PreemptionNotice,
    TrainResult,
    print_summary,
    resolve_resume,
    resume_position,
    run_folder,
    tensorboard,
)
from fastjepa.step import DIAGNOSTICS, ContextPredictor, FusedUpdate, HostCopy, NonfiniteGuard, StepResult, diagnose, train_step
from fastjepa.utils.masking import PackedMasks
from fastjepa.utils.schedulers import momentum_schedule
from fastjepa.weights import EncoderShape, init_encoder

__all__ = ["CSV_COLUMNS", "TrainResult", "fit", "main", "train_step"]

CHECKPOINT_FREQ = 50  # epochs between numbered checkpoint copies, as in the reference


def context_length(mask: torch.Tensor | PackedMasks) -> int:
    """The CSV's mask-A: the context length K of a dense (B, K) mask; with ``mask.ragged``,
    the mean context length over the batch, rounded to an int (``fastjepa plot`` reads
    mask-A as an integer). Host numbers only: no device sync."""
    if isinstance(mask, PackedMasks):
        return round(sum(mask.lengths) / mask.rows)
    return mask.shape[1]


COMPILE_BACKEND = "inductor"  # torch.compile's backend for meta.compile (the CPU tests use "aot_eager")


def say(message: str) -> None:
    """Print on rank 0 only."""
    if rank() == 0:
        print(message)


def mean(losses: list[float]) -> float:
    """The mean loss, 0 for none."""
    return sum(losses) / max(len(losses), 1)


def data_root(config: dict) -> str:
    """``root_path/image_folder/train`` when it exists (the reference's ImageNet layout),
    else ``root_path/image_folder`` itself: any folder of images."""
    root = os.path.join(config["data"]["root_path"], config["data"]["image_folder"])
    train = os.path.join(root, "train")
    return train if os.path.isdir(train) else root


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
        profiles = profile_ranks is None or rank() in profile_ranks
        return _train(config, resume_preempt, device, out, max_steps, seed, resume, checkpoint_every, progress,
                      profile_steps if profiles else None, torch_profiler if profiles else None)
    finally:
        if started_group:
            teardown()


@dataclass
class Run:
    """What one training run holds (``set_up`` builds it)."""

    config: dict
    device: torch.device
    folder: Path
    loader: ImageLoader
    model: torch.nn.Module  # the ContextPredictor, maybe under DDP or FSDP2
    target_encoder: torch.nn.Module
    target_shadow: Bf16Shadow | None
    optimizer: torch.optim.Optimizer
    schedulers: tuple  # lr, wd, momentum
    checkpoints: Checkpointer
    start_epoch: int
    start_itr: int
    update: FusedUpdate  # AdamW and the EMA, fused into one pass when optimization.fused_optimizer_ema is on for this device
    guard: NonfiniteGuard


@dataclass
class Progress:
    """What the loop counts, from the step it starts at."""

    step: int
    losses: list[float] = field(default_factory=list)
    skipped: int = 0  # images left out
    images_seen: int = 0
    saved: Path | None = None  # the last checkpoint written
    nonfinite_steps: int = 0
    preempted: bool = False  # agreed by every rank: a notice reached any of them
    diagnostics: dict | None = None  # the last diagnostics measured, with their step


def set_up(config: dict, device: torch.device, out, seed: int, resume, resume_preempt: bool) -> Run:
    """The run folder, the loader, the models (from the checkpoint resumed from, if any), the
    optimizer and its schedules, and the checkpoint writer."""
    data, mask, meta, opt_cfg = config["data"], config["mask"], config["meta"], config["optimization"]
    folder = run_folder(out, resume, config["logging"]["folder"])
    config["logging"]["folder"] = str(folder)
    loader = build_loader(config, device, seed, data_root(config), rank(), world_size(), all_gather_object)
    ipe = loader.steps_per_epoch

    torch.manual_seed(seed)
    encoder, predictor = init_model(device, mask["patch_size"], meta["model_name"], data["crop_size"], meta["pred_depth"], meta["pred_emb_dim"])
    checkpoint_path = resolve_resume(resume, resume_preempt, config, folder)
    if checkpoint_path is None and meta["init_weights"]:
        init_encoder(encoder, meta["init_weights"], EncoderShape(meta["model_name"], mask["patch_size"], data["crop_size"]))
        say(f"encoder and target encoder from {meta['init_weights']}; the predictor starts fresh")
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    encoder.grad_checkpointing = predictor.grad_checkpointing = meta["activation_checkpointing"]
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint is not None:  # into the whole models, before DDP or FSDP2 take them
        load_models(checkpoint, checkpoint_path, encoder, predictor, target_encoder)
    if meta["compile"]:  # before DDP wraps the modules (PyTorch's advice), after the target's copy
        for module in (encoder, predictor):
            compile_blocks(module, meta["compile"], COMPILE_BACKEND)
    model = wrap(ContextPredictor(encoder, predictor, meta["shared_context_predictor"]), target_encoder, meta, device,
                 accumulating=opt_cfg["grad_accum_steps"] > 1)
    optimizer, _, lr_scheduler, wd_scheduler = init_opt(
        encoder, predictor, ipe, opt_cfg["start_lr"], opt_cfg["lr"], opt_cfg["warmup"], opt_cfg["epochs"],
        opt_cfg["weight_decay"], opt_cfg["final_weight_decay"], opt_cfg["final_lr"], use_bfloat16=False, ipe_scale=opt_cfg["ipe_scale"])
    # use_bfloat16=False: no GradScaler (bf16 needs no loss scaling; fastjepa.step's guard skips non-finite steps)
    schedulers = (lr_scheduler, wd_scheduler, momentum_schedule(opt_cfg["ema"], ipe, opt_cfg["epochs"], opt_cfg["ipe_scale"]))
    start_epoch, start_itr = 0, 0
    if checkpoint is not None:
        start_epoch, start_itr = resume_position(checkpoint, checkpoint_path, optimizer, *schedulers, ipe)
        say(f"resumed from {checkpoint_path} at epoch {start_epoch}, step {start_itr} of {ipe}")
        del checkpoint

    # bf16 copies of the target's matmul weights for its forwards, refreshed by the EMA (whole tensors only: not under FSDP2)
    sharded = world_size() > 1 and meta["sharding"] == "fsdp"
    target_shadow = Bf16Shadow(target_encoder, encoder) if meta["use_bfloat16"] and not sharded else None
    if meta["compile"]:
        compile_blocks(target_shadow.module if target_shadow is not None else target_encoder, meta["compile"], COMPILE_BACKEND)
    fused, why = fused_optimizer_ema(opt_cfg["fused_optimizer_ema"], device)
    if fused or device.type == "cuda":  # on the CPU, auto's fallback is the expected path
        say(f"optimizer: {why}")
    checkpoints = Checkpointer(folder, config, seed, (encoder, predictor, target_encoder), optimizer, schedulers, rank() == 0, world_size())
    if checkpoint_path is not None:
        checkpoints.kept = (checkpoint_path, start_epoch, start_itr)
    return Run(config, device, folder, loader, model, target_encoder, target_shadow, optimizer, schedulers, checkpoints,
               start_epoch, start_itr, FusedUpdate(optimizer, encoder, target_encoder, target_shadow, fuse_ema=fused),
               NonfiniteGuard(model, halt=not meta["skip_nonfinite"]))


def fused_optimizer_ema(setting: bool | str, device: torch.device) -> tuple[bool, str]:
    """Whether AdamW and the EMA run as one ``adamw_ema_`` pass, and why, in words:
    ``optimization.fused_optimizer_ema`` true or false, or auto (on a GPU with the CUDA extension)."""
    if setting == "auto":
        problem = device_problem("cuda", device)
        if problem is not None:
            return False, f"AdamW, then the EMA (fused_optimizer_ema auto: {problem})"
        return True, "AdamW and the EMA in one pass (adamw_ema_, CUDA; fused_optimizer_ema auto)"
    return setting, "AdamW and the EMA in one pass (adamw_ema_)" if setting else "AdamW, then the EMA (fused_optimizer_ema false)"


def _train(config, resume_preempt, device, out, max_steps, seed, resume, checkpoint_every, progress, profile_steps, torch_profiler):
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    run = set_up(config, device, out, seed, resume, resume_preempt)
    meta, epochs, ipe = config["meta"], config["optimization"]["epochs"], run.loader.steps_per_epoch
    is_main = rank() == 0
    if is_main:
        with open(run.folder / "params-ijepa.yaml", "w") as f:
            yaml.dump(config, f)
    log = CSVLog(run.folder / f"{config['logging']['write_tag']}_r{rank()}.csv", (run.start_epoch, run.start_itr))
    board = tensorboard(run.folder) if is_main else None
    first_step = run.start_epoch * ipe + run.start_itr
    total_steps = epochs * ipe if max_steps is None else min(epochs * ipe, first_step + max_steps)
    processes = f" x {world_size()} processes ({meta['sharding']})" if world_size() > 1 else ""
    say(f"fastjepa train: {meta['model_name']} on {device.type}{processes}, {run.loader.num_images} images x{config['data']['repeat']} "
            f"({ipe} steps per epoch, data backend {run.loader.backend}), output folder: {run.folder}")
    if run.loader.skipped_files:
        say(f"skipping {len(run.loader.skipped_files)} files that are not images (e.g. {run.loader.skipped_files[0]})")

    counts = Progress(first_step, skipped=len(run.loader.rejected))
    profiler = StepProfiler(device, profile_steps, torch_profiler)
    preemption = PreemptionNotice()
    bar = tqdm(total=total_steps, initial=first_step, unit="step", disable=not (progress and is_main), dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for epoch in range(run.start_epoch, epochs):
            (counts.preempted,) = any_rank(preemption.received is not None, device=device)
            if counts.step >= total_steps or counts.preempted:
                break
            first_itr = run.start_itr if epoch == run.start_epoch else 0
            epoch_losses = run_epoch(run, epoch, first_itr, total_steps, checkpoint_every, counts, log, board, bar, profiler, preemption)
            if epoch_losses is None:  # stopped early: max_steps or a preemption notice
                break
            save_epoch_end(run.checkpoints, epoch, mean(epoch_losses))
            counts.saved = run.checkpoints.latest
    except KeyboardInterrupt:
        bar.close()
        last = run.checkpoints.latest if run.checkpoints.latest.exists() else "none written yet"
        say(f"\ninterrupted at step {counts.step}; the last complete checkpoint: {last}")
        raise
    finally:
        preemption.restore()
        bar.close()
        profiler.close(counts.step)
        log.close()
        if board is not None:
            board.close()

    if counts.preempted:
        say(f"\n{preemption.received or 'a preemption notice (on another rank)'} received: stopped after step {counts.step} "
                f"with the checkpoint {run.checkpoints.latest}; continue with --resume auto (or resume='auto')")
    elapsed = time.perf_counter() - started
    result = TrainResult(run.folder, len(counts.losses), counts.losses, counts.saved, counts.images_seen / elapsed if elapsed > 0 else 0.0,
                         counts.skipped, counts.nonfinite_steps, counts.preempted, counts.diagnostics)
    if is_main:
        print_summary(result, elapsed)
    return result


@dataclass
class Queued:
    """A step the host has queued but not read yet: what its log row needs."""

    epoch: int
    itr: int
    step: int
    result: StepResult
    context_length: int
    target_length: int
    step_ms: float
    throughput: float
    diagnostics: HostCopy | None


def run_epoch(run: Run, epoch: int, first_itr: int, total_steps: int, checkpoint_every, counts: Progress, log, board, bar, profiler,
              preemption) -> list[float] | None:
    """Steps first_itr .. of ``epoch``: its losses when it ran to its end, None when it stopped
    early (max_steps, after its checkpoint, or a preemption notice, with its checkpoint).

    The host reads each step's loss, non-finite flag and diagnostics one step late, once the
    next step is queued (``read_step``), so it never waits for the device inside the loop; the
    last queued step is read before a checkpoint, at the end of the epoch and when stopping.
    A non-finite step stops the run when read (``meta.skip_nonfinite: false``); the step queued
    after it was left out on the device (``NonfiniteGuard``'s halt)."""
    meta, ipe, device = run.config["meta"], run.loader.steps_per_epoch, run.device
    accum_steps = run.config["optimization"]["grad_accum_steps"]
    every = diagnostics_interval(run.config["logging"]["diagnostics_every"], ipe)
    epoch_losses, queued = [], None
    tick = time.perf_counter()

    def read_queued():
        nonlocal queued
        if queued is not None:
            read_step(queued, meta["skip_nonfinite"], counts, epoch_losses, log, board, bar)
            queued = None

    # images normalised on the device; masks drawn one step ahead, seeded by (seed, step, rank)
    for itr, (images, masks_enc, masks_pred, bad) in enumerate(run.loader.epoch(epoch, first_itr, counts.step), start=first_itr):
        counts.skipped += bad
        empty, counts.preempted = any_rank(len(images) == 0, preemption.received is not None, device=device)
        if counts.preempted:  # the notice came during the previous step: keep it, stop before this one
            read_queued()
            run.checkpoints.save(epoch, itr, mean(epoch_losses))
            counts.saved = run.checkpoints.latest
            return None
        if empty:  # no file of this batch decoded on some rank: every rank leaves the step out
            continue
        with profiler.step(counts.step):
            result = train_step(run.model, run.target_encoder, run.optimizer, *run.schedulers, images, masks_enc, masks_pred,
                                meta["use_bfloat16"], run.target_shadow, accum_steps=accum_steps, fused_optimizer_ema=run.update,
                                guard=run.guard)
        now = time.perf_counter()
        step_ms, throughput = (now - tick) * 1e3, len(images) / (now - tick)
        tick = now
        diagnostics = None
        if every and (counts.step + 1) % every == 0:  # after this step's update; dropped when the step was left out
            measured = diagnose(run.model, run.target_encoder, images, masks_enc, masks_pred, meta["use_bfloat16"], accum_steps)
            diagnostics = HostCopy(torch.stack([measured[name] for name in DIAGNOSTICS]))
            tick = time.perf_counter()  # outside the step's time and the next one's
        read_queued()
        queued = Queued(epoch, itr, counts.step, result, context_length(masks_enc[0]), masks_pred[0].shape[1], step_ms, throughput,
                        diagnostics)
        counts.images_seen += len(images)
        counts.step += 1
        bar.update(1)
        save, stop = mid_epoch_checkpoint(counts.step, itr, ipe, total_steps, checkpoint_every)
        if save or stop:
            read_queued()
        if save:
            run.checkpoints.save(epoch, itr + 1, mean(epoch_losses))
            counts.saved = run.checkpoints.latest
        if stop:
            return None
    read_queued()
    return epoch_losses


def read_step(step: Queued, skip_nonfinite: bool, counts: Progress, epoch_losses: list[float], log, board, bar) -> None:
    """A queued step's values on the host: its log row, TensorBoard scalars, progress bar and
    losses, or, when it was left out, the error that stops the run (or, with
    ``skip_nonfinite``, the count and a line)."""
    result = step.result
    if result.nonfinite is not None:
        where = f"epoch {step.epoch + 1}, step {step.itr} (global step {step.step})"
        if not skip_nonfinite:
            raise FloatingPointError(f"{result.nonfinite} at {where}; stopping without an update or a checkpoint "
                                     f"from this step (meta.skip_nonfinite: true skips such steps instead)")
        counts.nonfinite_steps += 1
        if rank() == 0:
            tqdm.write(f"skipped {where}: {result.nonfinite}")
        return
    diagnostics = dict(zip(DIAGNOSTICS, step.diagnostics.read())) if step.diagnostics is not None else None
    if diagnostics:
        counts.diagnostics = {"step": step.step + 1, **diagnostics}
    loss = result.loss_value
    log.row(step.epoch + 1, step.itr, f"{loss:.5f}", step.context_length, step.target_length, f"{step.step_ms:.1f}",
            f"{result.lr:.6g}", f"{result.wd:.6g}", f"{result.momentum:.6g}", f"{step.throughput:.2f}",
            *(f"{diagnostics[name]:.6g}" if diagnostics else "" for name in DIAGNOSTICS))
    if board is not None:
        for name, value in (("loss", loss), ("lr", result.lr), ("wd", result.wd), ("momentum", result.momentum), ("img_per_s", step.throughput),
                            *((f"diagnostics/{name}", value) for name, value in (diagnostics or {}).items())):
            board.add_scalar(name, value, step.step)
    counts.losses.append(loss)
    epoch_losses.append(loss)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{result.lr:.2e}", img_s=f"{step.throughput:.1f}", refresh=False)


def diagnostics_interval(diagnostics_every: int | None, ipe: int) -> int:
    """Steps between diagnostics: ``logging.diagnostics_every``, or by default 4 per epoch and at
    least 10 steps apart (0: never)."""
    return max(10, ipe // 4) if diagnostics_every is None else diagnostics_every


def mid_epoch_checkpoint(step: int, itr: int, ipe: int, total_steps: int, checkpoint_every: int | None) -> tuple[bool, bool]:
    """(save a checkpoint now, stop the epoch now) after step ``itr`` of an epoch of ``ipe``,
    ``step`` steps done in all. Inside an epoch, the last step (max_steps) and every
    checkpoint_every-th save; the epoch's end saves in the caller (``save_epoch_end``)."""
    stop, mid_epoch = step >= total_steps, itr + 1 < ipe
    return mid_epoch and (stop or (checkpoint_every is not None and step % checkpoint_every == 0)), stop and mid_epoch


def save_epoch_end(checkpoints: Checkpointer, epoch: int, average_loss: float) -> None:
    """The checkpoint at the end of ``epoch``: the latest, and a numbered copy every
    CHECKPOINT_FREQ epochs, as the reference."""
    checkpoints.save(epoch + 1, 0, average_loss)
    if (epoch + 1) % CHECKPOINT_FREQ == 0:
        checkpoints.save(epoch + 1, 0, average_loss, checkpoints.numbered(epoch + 1))


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
