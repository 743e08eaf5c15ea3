"""End-to-end I-JEPA training step: images/s, time per phase, peak memory and MFU.

    python benchmarks/bench_step.py                              # ViT-B/16, ViT-L/16, ViT-H/14, ViT-H/16-448; every mode (a GPU)
    python benchmarks/bench_step.py --models vit_huge --modes fastjepa,ragged --compile
    python benchmarks/bench_step.py --models vit_base/16 --modes fastjepa --cuda-graphs   # a GPU
    python benchmarks/bench_step.py --quick                      # ViT-tiny/8 at 64 px, a few steps: checks the script

Synthetic uint8 images already on the device, or with ``--data BACKEND`` batches from
fastjepa's loader (pil, dali or torchvision) over generated ImageNet-sized JPEGs, its masks
drawn one step ahead: the "data wait" phase is then the host time the step waits for its
batch. The published ViT-H/14 mask settings, predictor depth 12 and width 384. Modes:
  reference-eager  our own eager re-creation of the reference's step, for comparison only:
                   attention as explicit matrix products with an fp32 softmax, gathers with an
                   int64 index repeated to (B, K, D) plus cat, the context repeated per target
                   block, GradScaler with bf16, AdamW (foreach, not fused), a per-parameter EMA
                   loop, masks copied from pageable memory, and the reference's host syncs
                   (``float(loss)`` and ``torch.cuda.synchronize()`` every step);
  fastjepa         the trainer's own step, ``fastjepa.step.train_step``, with every fast path
                   (fused gather, fused EMA with the bf16 target shadow, SDPA) and no host sync:
                   its NaN/inf guard acts on the device, and the loss and the guard's flag are
                   read one step late, as the trainer reads them;
  ragged           fastjepa with ``mask.ragged`` (every sampled context token, varlen attention);
  shared-context   fastjepa with ``meta.shared_context_predictor``;
  reference-src    with ``--reference-src DIR``: the real reference models, ``apply_masks`` and
                   ``repeat_interleave_batch``, imported from your own checkout of
                   facebookresearch/ijepa (never vendored, never required), in the
                   reference-eager step (same optimizer, scaler, EMA loop and syncs).
``--finetune`` times ``fastjepa finetune``'s step instead (``fastjepa.finetune.loop.train_step``
after ``FinetuneAugment``, with the preset's recipe: MAE's ViT-H RandAugment, mixup/cutmix,
random erasing, layer decay; uint8 crops already on the device, 1000 classes): images/s and
the augmentation's share of the step, bf16 on a GPU.
``--compile``, ``--fused-optimizer-ema``, ``--grad-accum`` and ``--activation-checkpointing`` are
the trainer's own switches (meta.compile, optimization.fused_optimizer_ema, ...), through the
same functions; each row records which were on.
``--cuda-graphs`` compiles the blocks as ``--compile`` does, with ``mode="reduce-overhead"``:
torch.compile's CUDA graph trees replay each step's kernels as one graph. The mask shapes
change from step to step, so one graph is recorded per distinct shape (the first steps
record, later ones mostly replay); it pays where launch overhead is a large part of the step
(small models and batches), not for ViT-H at batch 128.
Times: the throughput run has no sync inside the timed steps; a second run records CUDA events
around each phase (NVTX ranges too, for ``nsys``), so the phases add up to a slightly slower
step. MFU counts the FLOPs of the reference's step (fastjepa.flops, the measured mean context
length) against the measured bf16 matmul ceiling (or --peak-tflops). Rows are appended to
benchmarks/results/bench_step.jsonl (or --results).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported by path (the tests), not run as a script
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import RESULTS, hardware, write_rows  # noqa: E402

from fastjepa.config import build_loader, validate  # noqa: E402
from fastjepa.data.normalize import normalize  # noqa: E402
from fastjepa.flops import step_flops_per_image  # noqa: E402
from fastjepa.helper import init_model, init_opt  # noqa: E402
from fastjepa.masks.multiblock import MultiBlockMaskSampler  # noqa: E402
from fastjepa.models.shadow import Bf16Shadow  # noqa: E402
from fastjepa.models.vision_transformer import compile_blocks  # noqa: E402
from fastjepa.profiling import nvtx_range  # noqa: E402
from fastjepa.step import ContextPredictor, FusedUpdate, NonfiniteGuard, PhaseHook, train_step, untimed  # noqa: E402
from fastjepa.utils.masking import PackedMasks  # noqa: E402
from fastjepa.utils.tensors import repeat_interleave_batch  # noqa: E402

# name -> (model, patch, crop, batch): the published configs' per-GPU batch for ViT-H
MODELS = {
    "vit_base/16": ("vit_base", 16, 224, 128),
    "vit_large/16": ("vit_large", 16, 224, 128),
    "vit_huge/14": ("vit_huge", 14, 224, 128),
    "vit_huge/16-448": ("vit_huge", 16, 448, 16),
}
QUICK_MODELS = {"vit_tiny/8-64": ("vit_tiny", 8, 64, 4)}
QUICK_MIN_KEEP = 2  # an 8x8 grid: the published min_keep of 10 exceeds the smallest target block
MODES = ("reference-eager", "fastjepa", "ragged", "shared-context")
REFERENCE_SRC_MODE = "reference-src"  # added to the modes by --reference-src DIR
MASKS = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
             min_keep=10, allow_overlap=False)
PHASES = ("data wait", "masks", "target forward", "context forward", "predictor", "loss", "backward", "optimizer", "ema")


# ----------------------------------------------------------------------------- timing


class PhaseTimer:
    """The step's phase hook for the phase run: CUDA events (or host time on the CPU) and an
    NVTX range around each phase. The throughput run passes ``fastjepa.step.untimed`` instead,
    so it times the same step code with nothing around its phases."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []
        self.nvtx = nvtx_range(device) or (lambda name: contextlib.nullcontext())

    @contextlib.contextmanager
    def __call__(self, name: str):
        with self.nvtx(name):
            start = self._mark()
            yield
            self.marks.append((name, start, self._mark()))

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def collect(self) -> dict[str, float]:
        """Milliseconds per phase for the steps recorded since the last call (summed per name)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for name, start, end in self.marks:
            ms = start.elapsed_time(end) if self.device.type == "cuda" else (end - start) * 1e3
            totals[name] = totals.get(name, 0.0) + ms
        self.marks = []
        return totals


# ----------------------------------------------------------- the reference's step, re-created


def _reference_attention(attn, x):
    """Explicit q k^T, softmax in fp32 (autocast's choice for softmax), attn @ v."""
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))


def _reference_blocks(blocks, x):
    for block in blocks:
        x = x + _reference_attention(block.attn, block.norm1(x))
        x = x + block.mlp(block.norm2(x))
    return x


def _reference_apply_masks(x, masks):
    """An int64 index repeated to (B, K, D) per mask, gather, cat."""
    return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.size(-1))) for m in masks], dim=0)


def reference_encoder(encoder, imgs, masks=None):
    x = encoder.patch_embed(imgs) + encoder.pos_embed
    if masks is not None:
        x = _reference_apply_masks(x, masks)
    return encoder.norm(_reference_blocks(encoder.blocks, x))


def reference_predictor(predictor, x, masks_x, masks):
    B = len(x) // len(masks_x)
    x = predictor.predictor_embed(x)
    x += _reference_apply_masks(predictor.predictor_pos_embed.repeat(B, 1, 1), masks_x)
    n_context = x.shape[1]
    pos = repeat_interleave_batch(_reference_apply_masks(predictor.predictor_pos_embed.repeat(B, 1, 1), masks), B, len(masks_x))
    pred_tokens = predictor.mask_token.repeat(pos.size(0), pos.size(1), 1) + pos
    x = torch.cat([x.repeat(len(masks), 1, 1), pred_tokens], dim=1)
    x = predictor.predictor_norm(_reference_blocks(predictor.predictor_blocks, x))
    return predictor.predictor_proj(x[:, n_context:])


# ------------------------------------------------------------------------------- the step


class Step:
    """One training step of a mode, split into phases; ``run(timer)`` returns the loss tensor."""

    def __init__(self, mode, model, patch, crop, batch, device, pred_depth, pred_emb_dim, compile_mode, min_keep, seed=0,
                 reference_src=None, data=None, accum_steps=1, activation_checkpointing=False, fused_optimizer_ema=False):
        """``accum_steps``, ``activation_checkpointing``, ``fused_optimizer_ema``: the trainer's
        switches, in fastjepa's modes (the reference has none of them)."""
        self.mode, self.device, self.batch, self.data = mode, device, batch, data
        torch.manual_seed(seed)
        self.source = _import_reference(reference_src) if mode == REFERENCE_SRC_MODE else None
        build = self.source["init_model"] if self.source else init_model
        self.encoder, self.predictor = build(device, patch, model, crop, pred_depth, pred_emb_dim)
        self.target = copy.deepcopy(self.encoder).requires_grad_(False)
        self.optimizer, _, self.lr_schedule, self.wd_schedule = init_opt(
            self.encoder, self.predictor, iterations_per_epoch=1000, start_lr=1e-4, ref_lr=1e-3, warmup=1, num_epochs=10,
            wd=0.04, final_wd=0.4)
        self.reference = mode in ("reference-eager", REFERENCE_SRC_MODE)
        self.accum_steps = 1 if self.reference else accum_steps
        self.encoder.grad_checkpointing = self.predictor.grad_checkpointing = activation_checkpointing and not self.reference
        if self.reference:  # the reference's AdamW (foreach, not fused) and its GradScaler; fastjepa's modes keep the trainer's
            self.optimizer = torch.optim.AdamW(self.optimizer.param_groups, foreach=device.type == "cuda")
            self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
        self.bf16 = device.type == "cuda"
        self.shadow = Bf16Shadow(self.target, self.encoder) if self.bf16 and not self.reference else None
        self.fused = fused_optimizer_ema and not self.reference
        self.targets, self.onlines = list(self.target.parameters()), list(self.encoder.parameters())
        self.sampler = MultiBlockMaskSampler(input_size=crop, patch_size=patch, **{**MASKS, "min_keep": min_keep})
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.images = [torch.randint(0, 256, (batch, 3, crop, crop), generator=g, dtype=torch.uint8).to(device) for _ in range(2)]
        self.cuda_graphs = compile_mode == "reduce-overhead" and not self.reference
        if compile_mode and not self.reference:  # the trainer's meta.compile: the blocks, in place, the token dimension dynamic
            for module in (self.encoder, self.predictor, self.shadow.module if self.shadow else self.target):
                compile_blocks(module, compile_mode)
        self.model = ContextPredictor(self.encoder, self.predictor, shared_context=mode == "shared-context")
        # what the trainer builds once per run
        self.update = FusedUpdate(self.optimizer, self.encoder, self.target, self.shadow, fuse_ema=self.fused) if not self.reference else None
        self.guard = NonfiniteGuard(self.model, halt=True) if not self.reference else None
        self.momentum = itertools.repeat(0.996)
        self.step_index, self.context_tokens, self.queued = 0, [], None

    def run(self, phase: PhaseHook) -> torch.Tensor:
        """One step: fastjepa's modes run ``fastjepa.step.train_step``, the trainer's step, with
        ``phase`` as its phase hook; the reference modes their own re-created step."""
        if self.cuda_graphs:  # a new step: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        imgs, masks_enc, masks_pred = self.batch_and_masks(phase)
        first = masks_enc[0]
        self.context_tokens.append(sum(first.lengths) / first.rows if isinstance(first, PackedMasks) else first.shape[1])
        if self.reference:
            loss = self.reference_step(phase, imgs, masks_enc, masks_pred)
        else:
            result = train_step(self.model, self.target, self.optimizer, self.lr_schedule, self.wd_schedule, self.momentum,
                                imgs, masks_enc, masks_pred, use_bfloat16=self.bf16, target_shadow=self.shadow, phase=phase,
                                accum_steps=self.accum_steps, fused_optimizer_ema=self.update, guard=self.guard)
            self.check_queued()
            self.queued = (self.step_index, result)
            loss = result.loss
        self.step_index += 1
        return loss

    def check_queued(self) -> None:
        """The previous step's guard, read one step late as the trainer reads it."""
        if self.queued is not None:
            index, result = self.queued
            self.queued = None
            if result.nonfinite:
                raise FloatingPointError(f"{self.mode}: {result.nonfinite} at step {index}")

    def batch_and_masks(self, phase: PhaseHook):
        if self.data is not None:  # images and masks (drawn one step ahead) from the loader
            with phase("data wait"):
                return self.data.next()
        imgs = normalize(self.images[self.step_index % 2])
        with phase("masks"):
            g = torch.Generator().manual_seed(self.step_index)
            if self.reference:  # host masks, copied from pageable memory
                masks_enc, masks_pred = self.sampler.sample(self.batch, generator=g)
                return imgs, *([m.to(self.device) for m in group] for group in (masks_enc, masks_pred))
            return imgs, *self.sampler.sample(self.batch, generator=g, device=self.device, ragged=self.mode == "ragged")

    def reference_step(self, phase: PhaseHook, imgs, masks_enc, masks_pred) -> torch.Tensor:
        """The reference's step as it runs there (or, with ``self.source``, its own models and helpers)."""
        self.lr_schedule.step(), self.wd_schedule.step()
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext():  # meta has no autocast
            with phase("target forward"), torch.no_grad():
                if self.source:
                    h = F.layer_norm(self.target(imgs), (self.target.embed_dim,))
                    h = self.source["repeat_interleave_batch"](self.source["apply_masks"](h, masks_pred), self.batch, len(masks_enc))
                else:
                    h = F.layer_norm(reference_encoder(self.target, imgs), (self.target.embed_dim,))
                    h = repeat_interleave_batch(_reference_apply_masks(h, masks_pred), self.batch, len(masks_enc))
            with phase("context forward"):
                z = self.encoder(imgs, masks_enc) if self.source else reference_encoder(self.encoder, imgs, masks_enc)
            with phase("predictor"):
                z = self.predictor(z, masks_enc, masks_pred) if self.source else reference_predictor(self.predictor, z, masks_enc, masks_pred)
            with phase("loss"):
                loss = F.smooth_l1_loss(z.float(), h.float())
        with phase("backward"):
            self.scaler.scale(loss).backward()
        with phase("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        with phase("ema"):
            m = next(self.momentum)
            with torch.no_grad():
                for t, o in zip(self.targets, self.onlines):
                    t.mul_(m).add_((1.0 - m) * o.detach())
        loss.item()  # the reference's per-step host syncs
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return loss.detach()


class LoaderBatches:
    """(images, masks_enc, masks_pred) from fastjepa's loader over a folder of JPEGs, epoch after epoch."""

    def __init__(self, backend: str, folder: Path, crop: int, patch: int, batch: int, min_keep: int, ragged: bool, workers: int,
                 device: torch.device):
        config = validate({
            "data": {"backend": backend, "root_path": str(folder), "image_folder": "", "crop_size": crop, "batch_size": batch,
                     "num_workers": workers, "repeat": max(1, -(-2 * batch // len(list(folder.glob("*.jpg")))))},
            "mask": {"patch_size": patch, "min_keep": min_keep, "ragged": ragged},
        })
        self.loader = build_loader(config, device, 0, str(folder))
        self.epoch, self.step, self.batches = 0, 0, iter(())

    def next(self):
        while True:
            batch = next(self.batches, None)
            if batch is None:
                self.batches = self.loader.epoch(self.epoch, 0, self.step)
                self.epoch += 1
            elif len(batch.images):
                self.step += 1
                return batch.images, batch.masks_enc, batch.masks_pred


def _import_reference(src) -> dict:
    """The reference's init_model, apply_masks and repeat_interleave_batch from a checkout."""
    if src is None:
        raise ValueError(f"mode {REFERENCE_SRC_MODE} needs --reference-src DIR")
    src = Path(src).resolve()
    if not (src / "src" / "helper.py").is_file():
        raise ValueError(f"--reference-src {src}: no src/helper.py there (a checkout of facebookresearch/ijepa?)")
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    import logging

    logging.getLogger().setLevel(logging.WARNING)  # the reference logs every model it builds
    from src.helper import init_model as reference_init_model
    from src.masks.utils import apply_masks
    from src.utils.tensors import repeat_interleave_batch as reference_repeat

    return {"init_model": reference_init_model, "apply_masks": apply_masks, "repeat_interleave_batch": reference_repeat}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name, spec, mode, device, args) -> dict:
    model, patch, crop, batch = spec
    pred_depth, pred_emb_dim = (2, 96) if args.quick else (12, 384)
    if args.batch_size:
        batch = args.batch_size
    min_keep = QUICK_MIN_KEEP if args.quick else MASKS["min_keep"]
    data = None
    if args.data:
        from bench_data import generated_images

        folder = generated_images(args.images, args.quick, args.images_dir)
        data = LoaderBatches(args.data, folder, crop, patch, batch, min_keep, mode == "ragged", args.workers, device)
    compile_mode = "reduce-overhead" if args.cuda_graphs else ("default" if args.compile else None)
    step = Step(mode, model, patch, crop, batch, device, pred_depth, pred_emb_dim, compile_mode, min_keep,
                reference_src=args.reference_src, data=data, accum_steps=args.grad_accum,
                activation_checkpointing=args.activation_checkpointing, fused_optimizer_ema=args.fused_optimizer_ema)
    off, on = untimed, PhaseTimer(device)
    for _ in range(args.warmup):
        step.run(off)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step.run(off)
    loss = float(loss)
    _sync(device)
    step.check_queued()
    step_ms = round((time.perf_counter() - started) * 1e3 / args.steps, 3)  # the row's img/s is computed from the row's step time
    phases = []
    for _ in range(max(1, args.steps // 2)):
        step.run(on)
        phases.append(on.collect())
    step.check_queued()
    phase_ms = {p: round(statistics.median(x.get(p, 0.0) for x in phases), 3) for p in PHASES}
    k_context = statistics.mean(step.context_tokens)
    flops = step_flops_per_image(model, crop, patch, pred_depth, pred_emb_dim, k_context=k_context,
                                 k_target=_mean_target_tokens(step.sampler), num_pred_masks=MASKS["npred"]).total
    images_per_s = batch * 1e3 / step_ms
    row = {
        "bench": "bench_step", "model": name, "mode": mode, "batch": batch, "compile": args.compile or args.cuda_graphs,
        "cuda_graphs": args.cuda_graphs, "quick": args.quick, "grad_accum_steps": step.accum_steps,
        "activation_checkpointing": step.encoder.grad_checkpointing, "fused_optimizer_ema": step.fused,
        "step_ms": step_ms, "images_per_s": round(images_per_s, 2), "phase_ms": phase_ms,
        "loss": round(loss, 5), "mean_context_tokens": round(k_context, 1), "flops_per_image": flops,
        "achieved_tflop_s": round(flops * images_per_s / 1e12, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "device": device.type, "hardware": hardware(device), "data": args.data or "synthetic",
    }
    if args.peak_tflops:
        row["mfu"] = round(row["achieved_tflop_s"] / args.peak_tflops, 4)
    return row


FINETUNE_PRESET = "finetune_in1k_mae_vith14"  # the recipe --finetune times (its augmentation and optimizer)
FINETUNE_CLASSES = 1000


def bench_finetune(name, spec, device, args) -> dict:
    """``fastjepa finetune``'s augmentation and step, the functions its loop calls, on uint8
    crops already on the device: their times apart (the augmentation's share) and together."""
    from fastjepa.finetune.loop import make_augment, make_optimizer, train_step
    from fastjepa.finetune.model import Classifier
    from fastjepa.finetune.recipe import load_preset, validate
    from fastjepa.models import vision_transformer as vit

    model_name, patch, crop, batch = spec
    batch = args.batch_size or batch
    config = validate(load_preset(FINETUNE_PRESET))
    config["meta"]["use_bfloat16"] = device.type == "cuda"
    torch.manual_seed(0)
    model = Classifier(getattr(vit, model_name)(img_size=[crop], patch_size=patch, drop_path_rate=config["model"]["drop_path"]),
                       FINETUNE_CLASSES).to(device)
    model.encoder.grad_checkpointing = args.activation_checkpointing
    if args.compile:
        compile_blocks(model.encoder, True)
    optimizer = make_optimizer(model, config, device)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4 * group["lr_scale"]
    augment = make_augment(config, FINETUNE_CLASSES)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, FINETUNE_CLASSES, (batch,), generator=g).to(device)

    def augment_ms() -> float:
        _sync(device)
        started = time.perf_counter()
        augment(images, labels, g)
        _sync(device)
        return (time.perf_counter() - started) * 1e3

    guard = NonfiniteGuard(model)

    def step(inputs, targets):
        return train_step(model, optimizer, inputs, targets, guard, config["meta"]["use_bfloat16"], args.grad_accum)[0]

    for _ in range(args.warmup):
        step(*augment(images, labels, g))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step(*augment(images, labels, g))
    _sync(device)
    step_ms = (time.perf_counter() - started) * 1e3 / args.steps
    augment_times = [augment_ms() for _ in range(max(1, args.steps // 2))]
    augment_median = statistics.median(augment_times)
    return {
        "bench": "bench_step", "model": name, "mode": "finetune", "preset": FINETUNE_PRESET, "batch": batch, "compile": args.compile,
        "grad_accum_steps": args.grad_accum, "activation_checkpointing": args.activation_checkpointing, "quick": args.quick,
        "step_ms": round(step_ms, 3), "images_per_s": round(batch * 1e3 / step_ms, 2), "augment_ms": round(augment_median, 3),
        "augment_share": round(augment_median / step_ms, 4), "loss": round(loss, 5), "use_bfloat16": config["meta"]["use_bfloat16"],
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "device": device.type, "hardware": hardware(device),
    }


def print_finetune_table(rows):
    print(f"{'model':<18}{'mode':<12}{'batch':>6}{'step ms':>10}{'img/s':>9}{'augment ms':>12}{'share':>8}")
    for r in rows:
        print(f"{r['model']:<18}{r['mode']:<12}{r['batch']:>6}{r['step_ms']:>10.2f}{r['images_per_s']:>9.1f}{r['augment_ms']:>12.2f}"
              f"{100 * r['augment_share']:>7.1f}%")


def _mean_target_tokens(sampler, draws: int = 20) -> float:
    g = torch.Generator().manual_seed(1)
    return statistics.mean(sampler.sample(8, generator=g)[1][0].shape[1] for _ in range(draws))


def print_table(rows):
    header = f"{'model':<18}{'mode':<34}{'batch':>6}{'step ms':>10}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'ctx K':>7}{'GiB':>7}  phases (ms)"
    print(header)
    print("-" * len(header))
    for r in rows:
        phases = " ".join(f"{k.split()[0]}={v:.1f}" for k, v in r["phase_ms"].items())
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
        gib = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else ""
        switches = "".join([f" accum={r['grad_accum_steps']}" if r["grad_accum_steps"] > 1 else "",
                            " ckpt" if r["activation_checkpointing"] else "", " compiled" if r["compile"] else "",
                            " fused" if r["fused_optimizer_ema"] else ""])
        print(f"{r['model']:<18}{r['mode'] + switches:<34}{r['batch']:>6}{r['step_ms']:>10.2f}{r['images_per_s']:>9.1f}"
              f"{r['achieved_tflop_s']:>9.2f}{mfu:>7}{r['mean_context_tokens']:>7.1f}{gib:>7}  {phases}")


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ViT-tiny at 64 px, batch 4, a few steps: checks the script")
    parser.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--batch-size", type=int, default=None, help="override the per-model batch size")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20, --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, --quick 1)")
    parser.add_argument("--compile", action="store_true",
                        help="fastjepa modes: the trainer's meta.compile (each block of the encoder, predictor and target compiled)")
    parser.add_argument("--fused-optimizer-ema", action="store_true",
                        help="fastjepa modes: the trainer's optimization.fused_optimizer_ema (AdamW and the EMA as adamw_ema_ passes)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="torch.compile with CUDA graph trees (mode reduce-overhead; fastjepa modes; a GPU)")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="K",
                        help="fastjepa modes: the batch as K micro-batches (optimization.grad_accum_steps); peak memory falls")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="fastjepa modes: recompute the blocks in the backward (meta.activation_checkpointing)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 matmul ceiling for MFU (default: measured here on a GPU, none on the CPU)")
    parser.add_argument("--reference-src", metavar="DIR", default=None,
                        help="a checkout of facebookresearch/ijepa: also time its real step (mode reference-src)")
    parser.add_argument("--data", choices=("pil", "dali", "torchvision"),
                        help="feed the steps from fastjepa's loader with this backend over generated JPEGs (default: synthetic images)")
    parser.add_argument("--images", type=int, default=512, help="generated JPEGs for --data (default 512)")
    parser.add_argument("--images-dir", type=Path, help="where the generated JPEGs are kept and reused (default: the temp directory)")
    parser.add_argument("--workers", type=int, default=8, help="loader workers (DataLoader workers, DALI threads) for --data")
    parser.add_argument("--finetune", action="store_true",
                        help="time fastjepa finetune's augmentation and step (MAE's ViT-H recipe) instead of pretraining's")
    parser.add_argument("--results", type=Path, default=RESULTS / "bench_step.jsonl")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    catalogue = QUICK_MODELS if args.quick else MODELS
    names = args.models.split(",") if args.models else list(catalogue)
    modes = args.modes.split(",") + ([REFERENCE_SRC_MODE] if args.reference_src else [])
    if args.grad_accum < 1:
        parser.error(f"--grad-accum must be >= 1, got {args.grad_accum}")
    for name in names:
        if name not in catalogue:
            parser.error(f"unknown model {name!r}: choose from {', '.join(catalogue)}")
    for mode in modes:
        if mode not in MODES + (REFERENCE_SRC_MODE,):
            parser.error(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.cuda_graphs and device.type != "cuda":
        parser.error("--cuda-graphs needs a CUDA device (CUDA graphs record GPU kernels); none is visible")
    if args.peak_tflops is None and device.type == "cuda":
        from bench_ceilings import matmul_tflops

        args.peak_tflops = matmul_tflops(device, 8192)
        print(f"{hardware(device)}: bf16 matmul ceiling {args.peak_tflops:.0f} TFLOP/s (MFU's denominator)")
    if args.finetune:
        rows = [bench_finetune(name, catalogue[name], device, args) for name in names]
        print_finetune_table(rows)
        write_rows(args.results, rows, [__file__, *argv])
        print(f"appended {len(rows)} rows to {args.results}")
        return rows
    rows = []
    for name in names:
        for mode in modes:
            try:
                rows.append(bench(name, catalogue[name], mode, device, args))
            except torch.OutOfMemoryError as e:
                print(f"{name} {mode}: out of memory ({str(e).splitlines()[0]})")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print_table(rows)
    write_rows(args.results, rows, [__file__, *argv])
    print(f"appended {len(rows)} rows to {args.results}")
    return rows


if __name__ == "__main__":
    main()
