"""The trainer's own fast paths: meta.compile (the blocks compiled, the token dimension dynamic)
and optimization.fused_optimizer_ema (AdamW and the EMA as adamw_ema_ passes).

On the CPU the compile tests use backend "aot_eager" (the graphs Dynamo and AOTAutograd
capture, run by eager kernels: the same ops in the same order), so their results are compared
bit for bit with eager; inductor's own reordering of float sums is not exercised here. The fused
update runs adamw_ema_'s torch backend, which is AdamW's single-tensor math: bit for bit."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from fastjepa import train as train_module
from fastjepa.cli import main as cli
from fastjepa.config import ConfigError, tiny_preset, validate
from fastjepa.helper import init_model, init_opt, read_checkpoint
from fastjepa.masks.multiblock import MultiBlockMaskSampler
from fastjepa.models.shadow import Bf16Shadow
from fastjepa.models.vision_transformer import compile_blocks
from fastjepa.step import ContextPredictor, FusedUpdate, train_step
from fastjepa.train import fit, fused_optimizer_ema

SMALL = dict(crop_size=48, batch_size=4, repeat=1, pred_depth=1, min_keep=1, epochs=4, warmup=1, progress=False, diagnostics_every=0)
CROP, PATCH = 48, 8


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoint_parts(folder) -> dict:
    checkpoint = read_checkpoint(folder / "jepa-latest.pth.tar")
    return {part: checkpoint[part] for part in ("encoder", "predictor", "target_encoder")}


def training(steps: int, fused: bool = False, compiled: bool = False, bf16: bool = False, ragged: bool = False, shared: bool = False,
             every_step=None):
    """``steps`` train_step calls of a seeded ViT-tiny pair on fresh random images with masks of
    changing lengths: (losses, encoder, predictor, target, optimizer, context lengths)."""
    torch.manual_seed(0)
    encoder, predictor = init_model("cpu", PATCH, "vit_tiny", CROP, 1, 48)
    target = copy.deepcopy(encoder).requires_grad_(False)
    optimizer, _, lr, wd = init_opt(encoder, predictor, 10, 1e-3, 1e-3, 0, 1, 0.04, 0.4)
    shadow = Bf16Shadow(target, encoder) if bf16 else None
    if compiled:
        for module in (encoder, predictor, shadow.module if shadow else target):
            compile_blocks(module, True, backend="aot_eager")
    momentum = iter([0.9, 0.95, 0.99, 0.995] * steps)
    generator = torch.Generator().manual_seed(0)
    sampler = MultiBlockMaskSampler(input_size=CROP, patch_size=PATCH, min_keep=1)
    model = ContextPredictor(encoder, predictor, shared_context=shared)
    fused_update = FusedUpdate(optimizer, encoder, target, shadow) if fused else None
    losses, lengths = [], []
    for step in range(steps):
        masks_enc, masks_pred = sampler.sample(4, generator=generator, ragged=ragged)
        lengths.append((masks_enc[0].max_len if ragged else masks_enc[0].shape[1], masks_pred[0].shape[1]))
        images = torch.randn(4, 3, CROP, CROP, generator=generator)
        result = train_step(model, target, optimizer, lr, wd, momentum, images, masks_enc, masks_pred, use_bfloat16=bf16,
                            target_shadow=shadow, fused_optimizer_ema=fused_update)
        losses.append(result.loss)
        if every_step is not None:
            every_step(step)
    return torch.stack(losses), encoder, predictor, target, optimizer, lengths


# ---------------------------------------------------------------------------- fused AdamW + EMA


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-shadow"])
def test_fused_update_equals_adamw_then_ema_bit_for_bit(bf16):
    plain, fused = training(3, bf16=bf16), training(3, fused=True, bf16=bf16)
    assert torch.equal(plain[0], fused[0])
    for a, b in zip(plain[1:4], fused[1:4]):
        assert same(a.state_dict(), b.state_dict())
    a, b = plain[4].state_dict(), fused[4].state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()  # the reference's AdamW format
    for index, state in a["state"].items():
        assert {k: (v.dtype, v.shape) for k, v in state.items()} == {k: (v.dtype, v.shape) for k, v in b["state"][index].items()}
        assert same(state, b["state"][index]) and state["step"].item() == 3
    # the comparison can fail: one step less leaves other weights
    assert not same(training(2, fused=True, bf16=bf16)[1].state_dict(), fused[1].state_dict())


def test_fused_update_continues_an_adamw_checkpoint_and_back():
    """An optimizer state written by AdamW continues under the fused pass (and the reverse) exactly."""
    def two_halves(first_fused: bool, second_fused: bool):
        torch.manual_seed(0)
        encoder, predictor = init_model("cpu", PATCH, "vit_tiny", CROP, 1, 48)
        target = copy.deepcopy(encoder).requires_grad_(False)
        optimizer, _, lr, wd = init_opt(encoder, predictor, 10, 1e-3, 1e-3, 0, 1, 0.04, 0.4)
        sampler = MultiBlockMaskSampler(input_size=CROP, patch_size=PATCH, min_keep=1)
        generator = torch.Generator().manual_seed(0)
        for step in range(4):
            if step == 2:  # through a checkpoint-like round trip of the optimizer state
                state = copy.deepcopy(optimizer.state_dict())
                optimizer, _, _, _ = init_opt(encoder, predictor, 10, 1e-3, 1e-3, 0, 1, 0.04, 0.4)
                optimizer.load_state_dict(state)
                lr.optimizer = wd.optimizer = optimizer
            masks_enc, masks_pred = sampler.sample(4, generator=generator)
            images = torch.randn(4, 3, CROP, CROP, generator=generator)
            train_step(ContextPredictor(encoder, predictor), target, optimizer, lr, wd, iter([0.99]), images, masks_enc, masks_pred,
                       fused_optimizer_ema=FusedUpdate(optimizer, encoder, target) if (first_fused if step < 2 else second_fused) else None)
        return encoder.state_dict(), target.state_dict()

    plain = two_halves(False, False)
    for mixed in ((False, True), (True, False)):
        assert all(same(a, b) for a, b in zip(two_halves(*mixed), plain)), mixed


def test_fused_update_refuses_an_optimizer_it_does_not_implement():
    encoder, predictor = init_model("cpu", PATCH, "vit_tiny", CROP, 1, 48)
    optimizer = torch.optim.AdamW(encoder.parameters(), amsgrad=True)
    with pytest.raises(ValueError, match="fused_optimizer_ema: needs AdamW without amsgrad or maximize"):
        FusedUpdate(optimizer, encoder, copy.deepcopy(encoder))


def test_the_trainer_switch_and_auto(tmp_path):
    assert fused_optimizer_ema("auto", torch.device("cpu")) == (False, "AdamW, then the EMA (fused_optimizer_ema auto: the cuda backend "
                                                                       "needs CUDA tensors, got cpu tensors)")
    assert fused_optimizer_ema(True, torch.device("cpu"))[0] and not fused_optimizer_ema(False, torch.device("cpu"))[0]
    plain = fit(out=tmp_path / "plain", max_steps=3, fused_optimizer_ema=False, **SMALL)
    fused = fit(out=tmp_path / "fused", max_steps=3, fused_optimizer_ema=True, **SMALL)
    assert plain.losses == fused.losses
    a, b = checkpoint_parts(tmp_path / "plain"), checkpoint_parts(tmp_path / "fused")
    assert all(same(a[part], b[part]) for part in a)
    for value in ("on", 1):
        config = tiny_preset()
        config["optimization"]["fused_optimizer_ema"] = value
        with pytest.raises(ConfigError, match="optimization.fused_optimizer_ema must be one of auto, true, false"):
            validate(config)


# ---------------------------------------------------------------------------- meta.compile


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # hitting the recompile limit fails the test
        yield
    torch._dynamo.reset()


def test_compiled_blocks_equal_eager_and_stop_compiling_after_two_steps_as_lengths_change(fresh_dynamo):
    graphs = []
    compiled = training(20, compiled=True, every_step=lambda step: graphs.append(counters["stats"]["unique_graphs"]))
    eager = training(20)
    assert len(set(compiled[5])) >= 5  # the context and target lengths did change
    assert graphs[0] > 0 and graphs[1] == graphs[-1], graphs  # no recompile after the first two steps
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[-1] <= torch._dynamo.config.recompile_limit
    assert torch.equal(compiled[0], eager[0])
    assert all(same(a.state_dict(), b.state_dict()) for a, b in zip(compiled[1:4], eager[1:4]))


@pytest.mark.parametrize("mode", [dict(ragged=True), dict(shared=True), dict(bf16=True)], ids=["ragged", "shared-context", "bf16-shadow"])
def test_compiled_blocks_in_the_other_modes(fresh_dynamo, mode):
    graphs = []
    compiled = training(6, compiled=True, every_step=lambda step: graphs.append(counters["stats"]["unique_graphs"]), **mode)
    eager = training(6, **mode)
    assert graphs[1] == graphs[-1], graphs
    assert not counters["graph_break"], dict(counters["graph_break"])  # the custom attention ops stay in the blocks' graphs
    assert torch.equal(compiled[0], eager[0])
    assert all(same(a.state_dict(), b.state_dict()) for a, b in zip(compiled[1:4], eager[1:4]))


def test_the_trainer_compiles_resumes_exactly_and_dry_run_says_so(tmp_path, monkeypatch, fresh_dynamo, capsys):
    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "aot_eager")
    straight = fit(out=tmp_path / "straight", max_steps=4, compile=True, **SMALL)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    fit(out=tmp_path / "diagnosed", max_steps=4, compile=True, **{**SMALL, "diagnostics_every": 1})
    assert counters["stats"]["unique_graphs"] == graphs  # the diagnostics' forwards run eagerly: no graph of their own
    fit(out=tmp_path / "split", max_steps=2, compile=True, **SMALL)
    resumed = fit(out=tmp_path / "split", max_steps=2, compile=True, resume="latest", **SMALL)
    eager = fit(out=tmp_path / "eager", max_steps=4, **SMALL)
    assert straight.losses == eager.losses and straight.losses[2:] == resumed.losses
    a, b, c = (checkpoint_parts(tmp_path / name) for name in ("straight", "split", "eager"))
    assert all(same(a[part], b[part]) and same(a[part], c[part]) for part in a)
    assert not any(key.startswith("_orig_mod") or "._orig_mod." in key for key in a["encoder"])  # the reference's key names
    capsys.readouterr()
    assert cli(["train", "--dry-run", "--set", "meta.compile=max-autotune"]) == 0
    assert "compile        the encoder's, predictor's and target's blocks (torch.compile, mode max-autotune" in capsys.readouterr().out
    assert cli(["train", "--dry-run"]) == 0
    assert "compile        off (meta.compile)" in capsys.readouterr().out
    config = tiny_preset()
    config["meta"]["compile"] = "yes"
    with pytest.raises(ConfigError, match='meta.compile must be one of false, true, max-autotune, got \'yes\''):
        validate(config)


def test_the_compile_numerics_benchmark_runs_the_trainers_step(tmp_path, fresh_dynamo):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_numerics.py"
    spec = importlib.util.spec_from_file_location("compile_numerics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = module.main(["--steps", "2", "--crop", "48", "--batch", "2", "--backend", "aot_eager", "--results", str(tmp_path / "rows.jsonl")])
    assert row["max_loss_relative_error"] == 0 and row["max_weight_relative_error"] == 0  # aot_eager: eager's kernels, eager's order
    assert '"bench": "compile_numerics"' in (tmp_path / "rows.jsonl").read_text()
