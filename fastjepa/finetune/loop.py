"""``fastjepa finetune``: the fine-tuning loop, on the trainer's machinery.

``main(config, weights, data=...)`` fine-tunes an encoder with a linear head (``Classifier``)
as MAE's recipe does (``fastjepa.finetune.recipe``), with the batches augmented on the device
(``fastjepa.finetune.augment``). Every epoch it measures top-1 on the held-out part of train
(which chooses ``finetune-best.pth.tar``) and top-1/top-5 on val (reported only).

What it shares with ``fastjepa train``: the loaders, the run folder, the atomic checkpoint
writer, the preemption notice (SIGTERM/SIGUSR1: finish the step, write the checkpoint, return),
the non-finite guard, DDP/FSDP2, compiled blocks, activation checkpointing, bf16 autocast,
gradient accumulation. A resumed run continues exactly: the data order and the augmentation of
step s are drawn from seeds of (seed, epoch, rank, step), and so is drop path's (the global
generator is seeded per step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from fastjepa.data.images import mix_seed
from fastjepa.data.normalize import normalize
from fastjepa.distributed import all_gather_object, any_rank, full_state, gradient_sync, rank, setup, teardown, unwrap, world_size, wrap_model
from fastjepa.errors import ConfigError
from fastjepa.eval.features import image_batches
from fastjepa.finetune.augment import FinetuneAugment, Mixup, RandomErasing, rand_augment_from_config
from fastjepa.finetune.data import Splits, load_finetune_splits, train_loader
from fastjepa.finetune.model import BN_EPS, Classifier
from fastjepa.finetune.recipe import base_lr, lr_at, param_groups, set_lr, validate
from fastjepa.helper import CheckpointError, load_optimizer, read_checkpoint, save_checkpoint
from fastjepa.models import vision_transformer as vit
from fastjepa.plot import FINETUNE_LOG
from fastjepa.run import CSVLog, PreemptionNotice, checkpoint_to_resume, run_folder, tensorboard
from fastjepa.step import NonfiniteGuard
from fastjepa.weights import checkpoint_weights, load_state, read_weights

LATEST = "finetune-latest.pth.tar"
BEST = "finetune-best.pth.tar"
CSV_COLUMNS = ("epoch", "step", "loss", "lr", "heldout top-1", "val top-1", "val top-5", "img/s")
COMPILE_BACKEND = "inductor"  # as the trainer's; the CPU tests use "aot_eager"
AUGMENT_STREAM = 2  # mixed into a step's seed for its augmentation, apart from drop path's


@dataclass
class FinetuneResult:
    folder: Path
    steps: int  # optimizer steps taken by this call
    losses: list[float]
    evaluations: list[dict]  # one per epoch ended in this call: epoch, heldout_top1, val_top1, val_top5
    best: dict | None  # the evaluation of finetune-best.pth.tar
    latest_checkpoint: Path | None
    images_per_second: float
    nonfinite_steps: int = 0
    preempted: bool = False


@dataclass
class Run:
    config: dict
    device: torch.device
    folder: Path
    splits: Splits
    model: Classifier  # maybe under DDP or FSDP2
    optimizer: torch.optim.AdamW
    augment: FinetuneAugment
    loader: object  # an ImageLoader serving labelled_epoch
    peak_lr: float
    source: str  # the weights fine-tuned
    seed: int
    crop_size: int  # the images' side (data.crop_size, or the encoder's)
    guard: NonfiniteGuard
    start_epoch: int = 0
    start_itr: int = 0
    best: dict | None = None
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    nonfinite_steps: int = 0


def say(message: str) -> None:
    if rank() == 0:
        print(message)


# ---------------------------------------------------------------------------- building the run


def build_classifier(state: dict, shape, source, num_classes: int, config: dict) -> Classifier:
    """The classifier on an encoder's weights (``state`` of ``shape``, read from ``source``),
    with the config's drop path and head."""
    encoder = getattr(vit, shape.model_name)(img_size=[shape.crop_size], patch_size=shape.patch_size, drop_path_rate=config["model"]["drop_path"])
    load_state(encoder, state, source)
    return Classifier(encoder, num_classes, config["model"]["head_norm"])


def make_optimizer(model: Classifier, config: dict, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the layer-decay groups (fused on a GPU); the lr is set at every step."""
    opt = config["optimization"]
    groups = param_groups(model, opt["weight_decay"], opt["layer_decay"])
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups], lr=0.0, fused=device.type == "cuda")


def make_augment(config: dict, num_classes: int) -> FinetuneAugment:
    """The config's augment section as a ``FinetuneAugment``."""
    augment = config["augment"]
    minmax = augment["cutmix_minmax"]
    mixup = Mixup(num_classes, mixup_alpha=augment["mixup"], cutmix_alpha=augment["cutmix"], cutmix_minmax=tuple(minmax) if minmax else None,
                  prob=augment["mixup_prob"], switch_prob=augment["mixup_switch_prob"], mode=augment["mixup_mode"],
                  label_smoothing=augment["label_smoothing"])
    erasing = RandomErasing(probability=augment["erase_prob"], mode=augment["erase_mode"]) if augment["erase_prob"] > 0 else None
    return FinetuneAugment(mixup, rand_augment_from_config(augment["rand_augment"]), erasing)


def set_up(config: dict, weights, data: str, device: torch.device, out, seed: int, resume, subset_options: dict) -> Run:
    folder = run_folder(out, resume)
    checkpoint_path = checkpoint_to_resume(resume, folder / LATEST, folder)
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint is not None:
        check_finetune_checkpoint(checkpoint, checkpoint_path)
        weights = weights or checkpoint["fastjepa_finetune"]["weights"]
    if weights is None:
        raise ConfigError("fastjepa finetune needs --weights or --checkpoint (the pretrained encoder), or --resume")
    if checkpoint is not None:
        state, shape = checkpoint_weights(checkpoint, "target", checkpoint_path)
    else:
        state, shape = read_weights(weights, config["model"]["encoder"])
    crop = config["data"]["crop_size"] or shape.crop_size
    if crop % shape.patch_size:
        raise ConfigError(f"data.crop_size {crop} is not a multiple of the encoder's patch size {shape.patch_size}")
    splits = load_finetune_splits(data, crop, config["data"]["holdout"], seed=seed, **subset_options)
    classes = splits.classes
    if checkpoint is not None and checkpoint["classes"] != classes:
        raise CheckpointError(f"checkpoint {checkpoint_path} has a head of {len(checkpoint['classes'])} classes "
                              f"({', '.join(checkpoint['classes'][:5])}, ...); --data {data} has {len(classes)} ({', '.join(classes[:5])}, ...)")
    torch.manual_seed(seed)
    model = build_classifier(state, shape, checkpoint_path or weights, len(classes), config)
    del state
    if checkpoint is not None:
        load_state(model.head, checkpoint["head"], checkpoint_path)
        if model.head_norm is not None:
            load_state(model.head_norm, checkpoint["head_norm"], checkpoint_path)
    model.to(device)
    meta, opt = config["meta"], config["optimization"]
    model.encoder.grad_checkpointing = meta["activation_checkpointing"]
    if meta["compile"]:
        vit.compile_blocks(model.encoder, meta["compile"], COMPILE_BACKEND)
    wrapped = wrap_model(model, meta["sharding"], device, accumulating=opt["grad_accum_steps"] > 1)
    optimizer = make_optimizer(model, config, device)
    loader = train_loader(config, splits.train, folder / "images" / "train", crop, device, seed, rank(), world_size(),
                          all_gather_object)
    global_batch = config["data"]["batch_size"] * world_size()
    run = Run(config, device, folder, splits, wrapped, optimizer, make_augment(config, len(classes)), loader,
              base_lr(config, global_batch), str(weights), seed, crop, NonfiniteGuard(wrapped))
    if checkpoint is not None:
        load_optimizer(checkpoint, checkpoint_path, optimizer)
        state = checkpoint["fastjepa_finetune"]
        run.start_epoch, run.start_itr, run.best = int(state["epoch"]), int(state["itr"]), state["best"]
        say(f"resumed from {checkpoint_path} at epoch {run.start_epoch}, step {run.start_itr} of {loader.steps_per_epoch}")
    say(f"fastjepa finetune: {shape.model_name}/{shape.patch_size} (pretrained at {shape.crop_size} px) at {crop} px from {weights}, "
        f"{len(classes)} classes; {len(splits.train)} training images "
        f"({len(splits.heldout)} held out to choose the best epoch), {len(splits.val)} val; peak lr {run.peak_lr:.3g} "
        f"(global batch {global_batch}); output folder {folder}")
    return run


def check_finetune_checkpoint(checkpoint: dict, path) -> None:
    missing = [key for key in ("encoder", "head", "classes", "opt", "fastjepa_finetune") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a fastjepa finetune checkpoint: it lacks {', '.join(missing)}")


# ---------------------------------------------------------------------------- one step


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (mixup/cutmix, label smoothing), the batch mean, in fp32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def train_step(model, optimizer, images: torch.Tensor, targets: torch.Tensor, guard: NonfiniteGuard, use_bfloat16: bool = False,
               accum_steps: int = 1, clip_grad: float | None = None) -> tuple[float, str | None]:
    """One fine-tuning step of ``model`` (a Classifier, maybe under DDP or FSDP2) on augmented
    images and their soft targets: forward and backward in ``accum_steps`` micro-batches (the
    gradients reduced across ranks in the last one's backward only), the non-finite guard
    (``guard``, the trainer's, built once per run; its one host sync also reads the loss),
    gradient clipping, the optimizer step. Returns (the loss, what was not finite or None); a
    non-finite step updates nothing."""
    parts = min(accum_steps, len(images))
    bounds = [len(images) * i // parts for i in range(parts + 1)]
    loss = None
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        with gradient_sync(model, enabled=i == parts - 1):
            with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=use_bfloat16):
                micro = soft_cross_entropy(model(images[a:b]), targets[a:b]) * ((b - a) / len(images))
            micro.backward()
        loss = micro.detach() if loss is None else loss + micro.detach()
    value, what = guard.check(loss).read()
    if what is not None:
        optimizer.zero_grad(set_to_none=True)
        return value, what
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value, None


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def accuracy(model, split, image_size: int, batch_size: int, device: torch.device, use_bfloat16: bool, num_workers: int = 0) -> tuple[float, float]:
    """(top-1, top-5) in % of ``model`` (eval mode) on ``split``, read with the evaluation
    transform; each rank takes every world_size-th image and the counts are summed."""
    indices = list(range(rank(), len(split), world_size()))
    k = min(5, unwrap(model).num_classes)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for start, batch in zip(range(0, len(indices), batch_size), image_batches(split, indices, "none", image_size, batch_size, 0, 0, num_workers)):
            labels = split.labels[indices[start : start + batch_size]].to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bfloat16):
                logits = model(normalize(batch.to(device, non_blocking=True)))
            top = logits.float().topk(k, dim=1).indices
            hits = top == labels[:, None]
            counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).double()
    finally:
        model.train(was_training)
    if world_size() > 1:
        dist.all_reduce(counts)
    top1, top5 = (counts * 100 / len(split)).tolist()
    return top1, top5


EVAL_BATCH = 256  # images per forward when measuring (no activations kept), as fastjepa eval's default


def evaluate_epoch(run: Run, epoch: int) -> dict:
    size, batch, bf16 = run.crop_size, max(EVAL_BATCH, run.config["data"]["batch_size"]), run.config["meta"]["use_bfloat16"]
    workers = run.config["data"]["num_workers"]
    heldout, _ = accuracy(run.model, run.splits.heldout, size, batch, run.device, bf16, workers)
    val1, val5 = accuracy(run.model, run.splits.val, size, batch, run.device, bf16, workers)
    return {"epoch": epoch + 1, "heldout_top1": heldout, "val_top1": val1, "val_top5": val5}


# ---------------------------------------------------------------------------- checkpoints


def save(run: Run, path: Path, epoch: int, itr: int) -> None:
    """The run's state at (epoch, itr), atomically; every rank calls it (FSDP2 gathers)."""
    model = unwrap(run.model)
    state = full_state({"encoder": model.encoder.state_dict(), "head": model.head.state_dict(),
                        "head_norm": model.head_norm.state_dict() if model.head_norm is not None else None,
                        "opt": run.optimizer.state_dict()})
    if rank() != 0:
        return
    save_checkpoint({**state, "classes": run.splits.classes, "epoch": epoch,
                     "fastjepa_finetune": {"config": run.config, "seed": run.seed, "epoch": epoch, "itr": itr, "best": run.best,
                                           "weights": run.source, "subset": run.splits.subset, "head_norm_eps": BN_EPS}}, path)


# ---------------------------------------------------------------------------- the loop


def main(config: dict, weights=None, data: str = "digits", *, per_class: int | None = None, fraction: float | None = None,
         subset=None, device=None, out=None, seed: int = 0, max_steps: int | None = None, resume=None, checkpoint_every: int | None = None,
         progress: bool = True) -> FinetuneResult:
    """Fine-tune the encoder at ``weights`` on ``data`` (``digits``, ``shapes-count``,
    ``shapes-dist`` or a folder with train/ and val/ class folders) with ``config`` (see
    ``fastjepa.finetune.recipe``). ``resume``: a checkpoint path, "latest" or "auto" (in the
    run folder). ``max_steps`` stops early, after writing a checkpoint."""
    config = validate(config)
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    device, started_group = setup(device)
    try:
        run = set_up(config, weights, data, device, out, seed, resume, {"per_class": per_class, "fraction": fraction, "subset": subset})
        return _loop(run, max_steps, checkpoint_every, progress)
    finally:
        if started_group:
            teardown()


def _loop(run: Run, max_steps, checkpoint_every, progress) -> FinetuneResult:
    config = run.config
    epochs, ipe = config["optimization"]["epochs"], run.loader.steps_per_epoch
    is_main = rank() == 0
    if is_main:
        with open(run.folder / "params-finetune.yaml", "w") as f:
            yaml.dump(config, f)
    log = CSVLog(run.folder / FINETUNE_LOG, (run.start_epoch, run.start_itr), CSV_COLUMNS) if is_main else None
    board = tensorboard(run.folder) if is_main else None
    counts = Counts(step=run.start_epoch * ipe + run.start_itr)
    total = epochs * ipe if max_steps is None else min(epochs * ipe, counts.step + max_steps)
    preemption = PreemptionNotice()
    bar = tqdm(total=epochs * ipe, initial=counts.step, unit="step", disable=not (progress and is_main), dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for epoch in range(run.start_epoch, epochs):
            first = run.start_itr if epoch == run.start_epoch else 0
            if not run_epoch(run, epoch, first, total, checkpoint_every, counts, preemption, log, board, bar):
                break  # max_steps or a preemption notice, inside the epoch: its checkpoint is written
            evaluation = evaluate_epoch(run, epoch)
            run.evaluations.append(evaluation)
            if run.best is None or evaluation["heldout_top1"] > run.best["heldout_top1"]:
                run.best = evaluation
                save(run, run.folder / BEST, epoch + 1, 0)
            save(run, run.folder / LATEST, epoch + 1, 0)
            counts.latest = run.folder / LATEST
            if is_main:
                log_evaluation(log, epoch + 1, ipe, evaluation)
                if board is not None:
                    for name in ("heldout_top1", "val_top1", "val_top5"):
                        board.add_scalar(name.replace("_", "/"), evaluation[name], counts.step)
                tqdm.write(f"epoch {epoch + 1}: held-out top-1 {evaluation['heldout_top1']:.2f}, "
                           f"val top-1 {evaluation['val_top1']:.2f}, top-5 {evaluation['val_top5']:.2f}")
            if counts.step >= total:
                break
    finally:
        preemption.restore()
        bar.close()
        if log is not None:
            log.close()
        if board is not None:
            board.close()
    elapsed = time.perf_counter() - started
    result = FinetuneResult(run.folder, counts.taken, run.losses, run.evaluations, run.best, counts.latest,
                            counts.images / elapsed if elapsed > 0 else 0.0, run.nonfinite_steps, counts.preempted)
    if counts.preempted:
        say(f"{preemption.received or 'a preemption notice (on another rank)'} received: stopped at step {counts.step} with the checkpoint "
            f"{counts.latest}; continue with --resume auto")
    if is_main:
        summary(result, elapsed)
    return result


@dataclass
class Counts:
    step: int  # optimizer steps of the run, this call's and before
    taken: int = 0  # steps taken by this call
    images: int = 0
    latest: Path | None = None  # the last checkpoint written
    preempted: bool = False


def run_epoch(run: Run, epoch: int, first: int, total: int, checkpoint_every, counts: Counts, preemption, log, board, bar) -> bool:
    """Steps first .. of ``epoch``; False when the run stops inside it (max_steps, or a
    preemption notice), after writing the checkpoint to resume from."""
    config, ipe = run.config, run.loader.steps_per_epoch
    opt = config["optimization"]
    tick = time.perf_counter()
    for itr, (images, labels, _) in enumerate(run.loader.labelled_epoch(epoch, first), start=first):
        empty, counts.preempted = any_rank(len(images) == 0, preemption.received is not None, device=run.device)
        if counts.preempted:  # the notice came during the previous step: keep it, stop before this one
            save(run, run.folder / LATEST, epoch, itr)
            counts.latest = run.folder / LATEST
            return False
        if empty:  # no file of this batch decoded on some rank: every rank leaves the step out
            continue
        lr = lr_at(epoch + itr / ipe, run.peak_lr, opt["min_lr"], opt["warmup_epochs"], opt["epochs"])
        set_lr(run.optimizer, lr)
        torch.manual_seed(mix_seed(run.seed, rank(), counts.step))  # drop path's draws, the same after a resume
        generator = torch.Generator().manual_seed(mix_seed(run.seed, rank(), counts.step, AUGMENT_STREAM))
        if len(images) % 2 and run.augment.mixup.active:  # a file of the batch failed: mixup pairs image i with B-1-i
            images, labels = images[:-1], labels[:-1]
        inputs, targets = run.augment(images, labels, generator)
        loss, nonfinite = train_step(run.model, run.optimizer, inputs, targets, run.guard, config["meta"]["use_bfloat16"],
                                     opt["grad_accum_steps"], opt["clip_grad"])
        where = f"epoch {epoch + 1}, step {itr} (global step {counts.step})"
        counts.step, counts.taken, counts.images = counts.step + 1, counts.taken + 1, counts.images + len(images)
        now = time.perf_counter()
        throughput, tick = len(images) / (now - tick), now
        if nonfinite is not None:
            if not config["meta"]["skip_nonfinite"]:
                raise FloatingPointError(f"{nonfinite} at {where}; stopping without an update or a checkpoint from this step "
                                         "(meta.skip_nonfinite: true skips such steps instead)")
            run.nonfinite_steps += 1
            if rank() == 0:
                tqdm.write(f"skipped {where}: {nonfinite}")
        else:
            run.losses.append(loss)
            if log is not None:
                log_step(log, epoch + 1, itr, loss, lr, throughput)
            if board is not None:
                board.add_scalar("loss", loss, counts.step)
                board.add_scalar("lr", lr, counts.step)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{throughput:.1f}", refresh=False)
        bar.update(1)
        stop = counts.step >= total
        if itr + 1 < ipe and (stop or (checkpoint_every is not None and counts.step % checkpoint_every == 0)):
            save(run, run.folder / LATEST, epoch, itr + 1)
            counts.latest = run.folder / LATEST
            if stop:
                return False
    return True


def summary(result: FinetuneResult, elapsed: float) -> None:
    lines = [f"done: {result.steps} steps in {elapsed:.0f} s, {result.images_per_second:.1f} img/s"]
    if result.evaluations:
        last = result.evaluations[-1]
        lines.append(f"last epoch ({last['epoch']}): held-out top-1 {last['heldout_top1']:.2f}, val top-1 {last['val_top1']:.2f}, "
                     f"top-5 {last['val_top5']:.2f}")
    if result.best is not None:
        best = result.best
        lines.append(f"best on held-out train: epoch {best['epoch']} (held-out top-1 {best['heldout_top1']:.2f}, val top-1 "
                     f"{best['val_top1']:.2f}, top-5 {best['val_top5']:.2f}): {result.folder / BEST}")
    if result.nonfinite_steps:
        lines.append(f"steps skipped for a non-finite loss or gradient: {result.nonfinite_steps}")
    lines += [f"output folder: {result.folder}", f"curves: fastjepa plot {result.folder}",
              f"export: fastjepa export {result.folder / BEST} --format hf --out DIR"]
    print("\n".join(lines))


def log_step(log: CSVLog, epoch: int, itr: int, loss: float, lr: float, throughput: float) -> None:
    log.row(epoch, itr, f"{loss:.5f}", f"{lr:.6g}", "", "", "", f"{throughput:.2f}")


def log_evaluation(log: CSVLog, epoch: int, itr: int, evaluation: dict) -> None:
    """The epoch's evaluation, as the row after its last step (itr = steps per epoch)."""
    log.row(epoch, itr, "", "", *(f"{evaluation[k]:.4f}" for k in ("heldout_top1", "val_top1", "val_top5")), "")
