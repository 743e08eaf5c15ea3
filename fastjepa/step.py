"""One I-JEPA training step: ``train_step`` and its parts (the targets, the loss, the EMA of the
target encoder, the non-finite guard). The trainer (``fastjepa.train``) and
``benchmarks/bench_step.py`` both run this step; nothing else re-implements it.

A phase hook, ``phase(name)`` returning a context manager, given to ``train_step`` wraps each
phase of the step: "target forward", "context forward" and "predictor" (handed to
``ContextPredictor.forward``, so that DDP and FSDP2 still wrap one module), "loss", "backward",
"optimizer" and "ema" (with gradient accumulation, the first five once per micro-batch). The default, ``untimed``, returns one shared ``nullcontext``: unused,
the hook costs nothing."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastjepa.distributed import any_rank_tensor, gradient_sync, local, unwrap
from fastjepa.models.shadow import Bf16Shadow
from fastjepa.ops import adamw_ema_, ema_update_, gather_tokens
from fastjepa.utils.masking import PackedMasks, _as_list, stack_masks
from fastjepa.utils.tensors import repeat_interleave_batch

PhaseHook = Callable[[str], ContextManager]
_UNTIMED = contextlib.nullcontext()


def untimed(name: str) -> ContextManager:
    """The default phase hook: nothing around any phase."""
    return _UNTIMED


class HostCopy:
    """A device tensor's values on their way to the host without a sync: on CUDA a non-blocking
    copy into pinned memory (a fresh block from the caching host allocator, so no later copy
    overwrites it) and an event after it; ``read()`` waits for that event only. On the CPU the
    tensor already is on the host."""

    def __init__(self, values: torch.Tensor):
        if values.device.type == "cuda":
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = values, None

    def read(self) -> list:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class StepResult:
    """What ``train_step`` queued. ``loss`` is 0-d, detached, still on the device. The step
    itself never waits for the device: ``loss_value`` (the loss on the host, None without
    the finite check) and ``nonfinite`` (what was not finite when the step was left out, else
    None) wait for the step's copy to the host when first read, so a caller that reads them
    after queueing the next step (the trainer) waits for nothing."""

    def __init__(self, loss: torch.Tensor, lr: float, wd: float, momentum: float, check: "FiniteCheck | None" = None,
                 on_skip: Callable[[], None] | None = None):
        self.loss, self.lr, self.wd, self.momentum = loss, lr, wd, momentum
        self._check, self._on_skip, self._read = check, on_skip, None

    def _values(self) -> tuple[float | None, str | None]:
        if self._read is None:
            if self._check is None:
                self._read = (None, None)
            else:
                self._read = self._check.read()
                if self._read[1] is not None and self._on_skip is not None:
                    self._on_skip()
        return self._read

    @property
    def loss_value(self) -> float | None:
        return self._values()[0]

    @property
    def nonfinite(self) -> str | None:
        return self._values()[1]


class ContextPredictor(nn.Module):
    """The trained pair: the context encoder and the predictor in one module, so that DDP
    has one reducer (and FSDP2 one root) for both. ``shared_context``: the predictor runs
    its shared-context layout (``meta.shared_context_predictor``). ``phase``: the step's phase
    hook, around "context forward" and "predictor"."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module, shared_context: bool = False):
        super().__init__()
        self.encoder, self.predictor, self.shared_context = encoder, predictor, shared_context

    def forward(self, imgs, masks_enc, masks_pred, phase: PhaseHook = untimed):
        extra = {"shared_context": True} if self.shared_context else {}  # a reference predictor takes no such keyword
        with phase("context forward"):
            z = self.encoder(imgs, masks_enc)
        with phase("predictor"):
            return self.predictor(z, masks_enc, masks_pred, **extra)


@torch.no_grad()
def target_tokens(target_encoder, imgs, num_context_masks: int, masks_pred: Sequence[torch.Tensor]) -> torch.Tensor:
    """The targets: the target encoder's output after a LayerNorm without affine (eps 1e-5),
    gathered at every target block and repeated once per context mask (mask-major)."""
    return targets_at(target_encoder(imgs), num_context_masks, masks_pred)


def targets_at(features: torch.Tensor, num_context_masks: int, masks_pred: Sequence[torch.Tensor]) -> torch.Tensor:
    """The target encoder's (B, N, D) output as ``target_tokens`` returns it."""
    h = F.layer_norm(features, (features.size(-1),))
    B = len(features)
    target_index = repeat_interleave_batch(stack_masks(masks_pred, B), B, repeat=num_context_masks)
    return gather_tokens(h, target_index.to(h.device))


def split_batch(imgs: torch.Tensor, masks_enc, masks_pred, parts: int) -> list[tuple]:
    """The batch as ``parts`` micro-batches of consecutive samples, ``(imgs, masks_enc,
    masks_pred)`` each: slices of the images and of every mask (dense or packed), so each
    micro-batch keeps the batch's mask lengths. Sizes differ by at most one; none is empty."""
    masks_enc, masks_pred, B = _as_list(masks_enc), _as_list(masks_pred), len(imgs)
    if parts == 1:
        return [(imgs, masks_enc, masks_pred)]
    bounds = [B * i // parts for i in range(parts + 1)]
    return [(imgs[a:b], [m.select_rows(a, b) if isinstance(m, PackedMasks) else m[a:b] for m in masks_enc], [m[a:b] for m in masks_pred])
            for a, b in zip(bounds, bounds[1:]) if b > a]


def jepa_loss(model, target_encoder, imgs, masks_enc: Sequence[torch.Tensor | PackedMasks], masks_pred: Sequence[torch.Tensor],
              phase: PhaseHook = untimed) -> torch.Tensor:
    """Smooth-L1 (beta 1, mean) between the predictor's output (``model``: a
    ContextPredictor, maybe under DDP or FSDP2) and the target encoder's output after a
    LayerNorm without affine (eps 1e-5), at the target blocks.

    ``masks_enc`` may be ``PackedMasks`` (``mask.ragged``: every context token kept, the
    encoder and predictor run on packed tokens). The target masks and the loss are the
    same in every mode."""
    masks_enc = _as_list(masks_enc)
    with phase("target forward"):
        h = target_tokens(target_encoder, imgs, len(masks_enc), masks_pred)
    z = model(imgs, masks_enc, masks_pred, phase)
    with phase("loss"):
        dtype = torch.promote_types(z.dtype, torch.float32)  # fp32 under bf16 autocast, fp64 stays fp64
        return F.smooth_l1_loss(z.to(dtype), h.to(dtype))


class FusedUpdate:
    """``optimizer.step()`` then the EMA of the encoder into the target (and its bf16 shadow), as
    ``adamw_ema_`` passes; with ``fuse_ema`` (``optimization.fused_optimizer_ema``) the EMA is in
    the same pass: the encoder's parameters with their targets (and bf16 shadows), the
    predictor's without; a parameter without a gradient only follows the EMA. Without, one
    AdamW pass over every parameter, then ``ema_update_`` (or the shadow's). On the CPU both
    equal ``torch.optim.AdamW`` then ``ema_update_`` bit for bit. The state stays AdamW's
    (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter, made as AdamW makes them), with every
    group's current lr and weight decay; under FSDP2, the local shards. AdamW's per-parameter
    steps are equal here (every trained parameter has a gradient at every step), so each pass
    counts with its first parameter's and the others follow.

    ``skip`` (a 0-d bool on the device, from the step's finite check) leaves every weight,
    moment, step count, target and shadow as it was, without the host reading it:
    ``adamw_ema_``'s own skip, and a momentum of 1 for the EMA outside it (exact, but for a
    target that is exactly -0.0 becoming +0.0).

    What a run keeps fixed (which parameter goes through which pass, with which target, shadow
    and group) is worked out once, here: walking the modules' parameters costs milliseconds of
    host time for a ViT-H, at the point of the step where the GPU waits for the host."""

    def __init__(self, optimizer: torch.optim.AdamW, encoder: nn.Module, target_encoder, target_shadow: Bf16Shadow | None = None,
                 fuse_ema: bool = True):
        groups = optimizer.param_groups
        if any(g["amsgrad"] or g["maximize"] or g["betas"] != groups[0]["betas"] or g["eps"] != groups[0]["eps"] for g in groups):
            raise ValueError("fused_optimizer_ema: needs AdamW without amsgrad or maximize, with one betas and eps for every group")
        self.optimizer, self.betas, self.eps = optimizer, groups[0]["betas"], groups[0]["eps"]
        group_of = {p: i for i, group in enumerate(groups) for p in group["params"]}
        self.device = local(next(iter(group_of))).device
        self.ema: list[tuple[list, list, list]] = []  # the EMA's (targets, onlines, shadows) lists after the AdamW pass
        if target_shadow is not None:
            (targets, onlines, shadows), (shared_targets, shared_onlines) = target_shadow.shadowed, target_shadow.shared
            ema = [(onlines, targets, shadows), (shared_onlines, shared_targets, [])]
        else:
            ema = [(list(encoder.parameters()), list(target_encoder.parameters()), [])]
        if fuse_ema:
            in_encoder = set(encoder.parameters())
            passes = [*ema, ([p for p in group_of if p not in in_encoder], [], [])]
        else:
            passes = [(list(group_of), [], [])]
            self.ema = [([local(t) for t in targets], [local(p) for p in onlines], shadows) for onlines, targets, shadows in ema]
        self.passes = [(params, targets, shadows, [group_of.get(p) for p in params]) for params, targets, shadows in passes]
        self.target_dtype = next(iter(target_encoder.parameters())).dtype
        self.calls = 0

    def _ema_momentum(self, momentum: float, skip: torch.Tensor | None) -> float | torch.Tensor:
        """The EMA's momentum outside ``adamw_ema_``: 1 on a skipped step (as ``ema_update_``
        makes a float's: fp64 for fp64 targets)."""
        if skip is None:
            return momentum
        dtype = torch.float64 if self.target_dtype == torch.float64 else torch.float32
        return torch.full((), momentum, dtype=dtype, device=self.device).masked_fill_(skip, 1.0)

    @torch.no_grad()
    def __call__(self, momentum: float, skip: torch.Tensor | None = None) -> Callable[[], None]:
        """AdamW (and the fused EMA); returns what undoes the AdamW states this call made, for
        when the host learns that the step was skipped (see ``forget``)."""
        self.calls += 1
        groups = self.optimizer.param_groups
        hyper = torch.tensor([[g["lr"] for g in groups], [g["weight_decay"] for g in groups]], dtype=torch.float64,
                             pin_memory=self.device.type == "cuda")
        lr, wd = hyper.to(self.device, non_blocking=True)  # one copy; the torch backend computes in fp64, as AdamW
        ema_momentum, fresh = self._ema_momentum(momentum, skip), []
        for params, targets, shadows, group in self.passes:
            trained = [i for i, p in enumerate(params) if p.grad is not None]
            followed = [i for i, p in enumerate(params) if p.grad is None] if targets else []
            if followed:
                ema_update_([local(targets[i]) for i in followed], [local(params[i]) for i in followed], ema_momentum,
                            [shadows[i] for i in followed] if shadows else ())
            if not trained:
                continue
            fresh += [params[i] for i in trained if not self.optimizer.state.get(params[i])]
            states = [_adamw_state(self.optimizer, params[i]) for i in trained]
            adamw_ema_([local(params[i]) for i in trained], [local(params[i].grad) for i in trained], [local(s["exp_avg"]) for s in states],
                       [local(s["exp_avg_sq"]) for s in states], states[0]["step"], lr, wd, [group[i] for i in trained],
                       betas=self.betas, eps=self.eps, targets=[local(targets[i]) for i in trained] if targets else (),
                       momentum=momentum if targets else None, shadows=[shadows[i] for i in trained] if shadows else (), skip=skip)
            if len(states) > 1:
                steps = [s["step"] for s in states[1:]]
                torch._foreach_add_(steps, 1.0 if skip is None else [skip.logical_not().float()] * len(steps))
        call = self.calls
        return lambda: self.forget(fresh, call)

    def forget(self, fresh: list[torch.Tensor], call: int) -> None:
        """Drops the AdamW states of ``fresh`` that call number ``call`` made, when it was
        skipped and no later call has used them: zero moments and step 0 are no state at all,
        as ``torch.optim.AdamW`` leaves none after a step it never took."""
        if call == self.calls:
            for param in fresh:
                del self.optimizer.state[param]

    @torch.no_grad()
    def update_target(self, momentum: float, skip: torch.Tensor | None = None) -> None:
        """The EMA after the AdamW pass (``fuse_ema`` false; nothing otherwise)."""
        if self.ema:
            ema_momentum = self._ema_momentum(momentum, skip)
            for targets, onlines, shadows in self.ema:
                ema_update_(targets, onlines, ema_momentum, shadows)


def _adamw_state(optimizer: torch.optim.AdamW, param: torch.Tensor) -> dict:
    """AdamW's state of ``param``, made as AdamW makes it on its first step (zero moments, a
    float32 step), with the step on the parameter's device (``adamw_ema_`` reads it there)."""
    state = optimizer.state[param]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=local(param).device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    elif state["step"].device != local(param).device:
        state["step"] = state["step"].to(local(param).device)
    return state


def effective_rank(features: torch.Tensor) -> torch.Tensor:
    """RankMe (Garrido et al. 2023) of (n, D) features: exp of the entropy of the singular
    values normalised to sum 1 (plus 1e-7 each, as the paper); 0-d fp32. Between 1 (one shared
    direction) and min(n, D); 0 for all-zero features, NaN for non-finite ones."""
    features = features.float()
    finite = torch.isfinite(features).all()
    singular = torch.linalg.svdvals(torch.where(finite, features, 0.0))  # the SVD refuses NaN; the result is NaN then
    total = singular.sum()
    p = singular / total + 1e-7
    rank = torch.where(total > 0, torch.exp(-(p * p.log()).sum()), 0.0)  # no host sync
    return torch.where(finite, rank, float("nan"))


DIAGNOSTICS = ("target_std", "target_rank", "pred_rank", "pred_cosine")


@torch.no_grad()
def diagnose(model, target_encoder, imgs, masks_enc, masks_pred, use_bfloat16: bool = False, accum_steps: int = 1) -> dict[str, torch.Tensor]:
    """Collapse and health diagnostics of the models on one batch, as 0-d fp32 tensors on the
    device (reading them is the caller's one sync), named as ``DIAGNOSTICS``:
    target_std, the standard deviation across the batch of the target encoder's
    average-pooled features (mean over channels; collapse drives it to 0); target_rank and
    pred_rank, the effective rank (``effective_rank``) of those pooled features and of the
    predictor's outputs pooled over each row's target tokens; pred_cosine, the mean cosine
    between each predicted token and its target. Runs the forwards without gradients, in
    ``accum_steps`` micro-batches as the step does (``model`` outside its DDP wrapper, so no
    gradient hooks; under FSDP2 its all-gathers run, on every rank, which all diagnose at the
    same steps), eagerly even when the blocks are compiled (no graph is compiled for these
    rare gradient-free forwards)."""
    pooled_targets, pooled_predictions, cosines = [], [], []
    with torch.compiler.set_stance("force_eager"):
        for micro_imgs, micro_enc, micro_pred in split_batch(imgs, masks_enc, masks_pred, accum_steps):
            with torch.autocast(device_type=imgs.device.type, dtype=torch.bfloat16, enabled=use_bfloat16):
                features = target_encoder(micro_imgs)
                targets = targets_at(features, len(micro_enc), micro_pred)
                predictions = unwrap(model)(micro_imgs, micro_enc, micro_pred)
            pooled_targets.append(features.float().mean(dim=1))
            pooled_predictions.append(predictions.float().mean(dim=1))
            cosines.append(F.cosine_similarity(predictions.float(), targets.float(), dim=-1).flatten())
    pooled_targets = torch.cat(pooled_targets)
    return {"target_std": pooled_targets.std(dim=0, unbiased=False).mean(), "target_rank": effective_rank(pooled_targets),
            "pred_rank": effective_rank(torch.cat(pooled_predictions)), "pred_cosine": torch.cat(cosines).mean()}


def nonfinite_flag(loss: torch.Tensor, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(flag, per_tensor): a 0-d bool on the device, true when the loss or any gradient holds
    NaN or inf on any rank, and this rank's (len(grads),) bools, one per gradient. The 1-norms
    carry every NaN and inf through their sums on every device (an infinity norm's max need
    not) and stay finite for any sane gradient. ``grads`` must not hold empty tensors."""
    if grads:
        per_tensor = ~torch.isfinite(torch.stack(torch._foreach_norm(grads, 1)))
    else:
        per_tensor = torch.zeros(0, dtype=torch.bool, device=loss.device)
    return any_rank_tensor(~torch.isfinite(loss) | per_tensor.any()), per_tensor


class NonfiniteGuard:
    """The step's non-finite guard, built once per run: the model's trained parameters with
    their names (a FSDP2 rank's empty shards left out), whose gradients ``check`` looks at. With
    ``halt`` (``meta.skip_nonfinite: false``) a skipped step also skips every later one, through
    a flag kept on the device: the host learns of a bad step one step late, after it queued the
    next, and must find nothing updated from the bad step on when it stops the run."""

    def __init__(self, model, halt: bool = False):
        self.params = [(name, p) for name, p in unwrap(model).named_parameters() if p.requires_grad and local(p).numel()]
        self.halt, self.halted = halt, None

    def check(self, loss: torch.Tensor) -> "FiniteCheck":
        present = [(name, p.grad) for name, p in self.params if p.grad is not None]
        bad, per_tensor = nonfinite_flag(loss, [local(g) for _, g in present])
        skip = bad
        if self.halt:
            skip = bad if self.halted is None else bad | self.halted
            self.halted = skip
        return FiniteCheck(loss, bad, skip, per_tensor, [name for name, _ in present])


class FiniteCheck:
    """One step's finite check: ``skip`` (0-d bool on the device) says to leave the update out.
    The flags and the loss start their way to the host at once (``HostCopy``); the
    per-gradient flags stay on the device, read only when the step was bad, for the names."""

    def __init__(self, loss: torch.Tensor, bad: torch.Tensor, skip: torch.Tensor, per_tensor: torch.Tensor, names: list[str]):
        self.skip, self.per_tensor, self.names = skip, per_tensor, names
        self.copy = HostCopy(torch.cat([torch.stack([bad, skip]).to(loss.dtype), loss.reshape(1)]))

    def read(self) -> tuple[float, str | None]:
        """(the loss, what was not finite or why the step was left out; None for a step taken)."""
        bad, skip, loss = self.copy.read()
        if not skip:
            return loss, None
        if not bad:
            return loss, "left out after an earlier non-finite step"
        parts = [] if math.isfinite(loss) else [f"loss is {loss}"]
        names = [name for name, flag in zip(self.names, self.per_tensor.tolist()) if flag]
        if names:
            parts.append(f"non-finite gradients in {len(names)} tensors ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        return loss, "; ".join(parts) or "non-finite loss or gradients on another rank"


def train_step(
    model,
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
    check_finite: bool = True,
    phase: PhaseHook = untimed,
    accum_steps: int = 1,
    fused_optimizer_ema: FusedUpdate | None = None,
    guard: NonfiniteGuard | None = None,
) -> StepResult:
    """One I-JEPA iteration in the reference's order: schedules, forward under bf16
    autocast (when asked), loss, backward, optimizer step, zero_grad, EMA. ``model``: a
    ContextPredictor, maybe under DDP or FSDP2. With a ``target_shadow`` (bf16 autocast
    only) the target forward runs on the shadow, and the EMA refreshes it: the same
    values, without autocast's per-forward weight casts. ``check_finite``: a loss or
    gradient with NaN or inf (on any rank) leaves the weights, the optimizer state and the
    target as they were, decided on the device, and ``StepResult.nonfinite`` says what
    when read. Nothing in the step waits for the device: the loss and the flags reach the
    host by a non-blocking copy, read from the result (``StepResult.loss_value``), best
    after the next step is queued. ``phase``: the hook around every phase (see the module
    docstring); the optimizer's includes the finite check. ``accum_steps``: the batch
    runs as that many micro-batches (``split_batch``), each loss scaled by its share of the
    batch, so the summed gradients and the loss are the whole batch's mean; gradients are
    reduced across ranks in the last micro-batch's backward only. Then one update.
    ``fused_optimizer_ema``: the run's ``FusedUpdate`` of ``optimizer`` and these encoders (with
    ``fuse_ema``, AdamW and the EMA in one pass in the "optimizer" phase, the same math);
    ``guard``: the run's ``NonfiniteGuard`` of ``model``. Both are built once per run; without
    them the step builds its own (walking the modules: host time on every step)."""
    if target_shadow is not None and not use_bfloat16:
        raise ValueError("train_step: target_shadow holds bf16 weights and needs use_bfloat16=True")
    update = fused_optimizer_ema
    if update is None:
        update = FusedUpdate(optimizer, unwrap(model).encoder, target_encoder, target_shadow, fuse_ema=False)
    if guard is None and check_finite:
        guard = NonfiniteGuard(model)
    lr = lr_scheduler.step()
    wd = wd_scheduler.step()
    target_forward = target_shadow.module if target_shadow is not None else target_encoder
    micro_batches = split_batch(imgs, masks_enc, masks_pred, accum_steps)
    loss = None
    for i, (micro_imgs, micro_enc, micro_pred) in enumerate(micro_batches):
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):
            # no autocast context at all without bf16 (the meta device, bench_host's stand-in for a GPU, has none)
            with torch.autocast(device_type=imgs.device.type, dtype=torch.bfloat16) if use_bfloat16 else _UNTIMED:
                micro_loss = jepa_loss(model, target_forward, micro_imgs, micro_enc, micro_pred, phase)
            if len(micro_batches) > 1:  # its share of the batch mean (one micro-batch: the loss itself, no extra kernels)
                micro_loss = micro_loss * (len(micro_imgs) / len(imgs))
            with phase("backward"):
                micro_loss.backward()
        loss = micro_loss.detach() if loss is None else loss + micro_loss.detach()
    momentum = next(momentum_scheduler)
    with phase("optimizer"):
        check = guard.check(loss) if guard is not None else None
        skip = check.skip if check is not None else None
        forget_fresh_state = update(momentum, skip)
        optimizer.zero_grad(set_to_none=True)
    if update.ema:
        with phase("ema"):
            update.update_target(momentum, skip)
    return StepResult(loss, lr, wd, momentum, check, forget_fresh_state)
