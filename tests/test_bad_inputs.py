"""The bad-input sweep: every public entry point gets bad input and must answer with a clear
error (its type, and a message that names the problem) and lose nothing already saved.

One table per entry point, each row (input, expected error, words the message must hold):

1. the command line (``fastjepa.cli.main``): exit code 2 for usage and config, 1 for run failures;
2. the config: ``validate``, ``apply_override``, ``load_yaml`` and ``fit(**keys)``;
3. the ops (gather_tokens dense and packed, pos_tokens, ema_update_, adamw_ema_,
   varlen_attention, shared_context_attention) on every backend here: dtype, device, shape,
   stride, index range, offsets; inputs are left unchanged; strided inputs the ops take give
   the contiguous result (or a kernel says it needs contiguous tensors);
4. image folders: empty, no images, only unreadable files; a mixed folder trains;
5. checkpoints: truncated, random bytes, empty, not a dict, missing keys, another model size,
   an optimizer that does not fit; through read_checkpoint, load_checkpoint, fit(resume=) and
   ``fastjepa eval``, and the run folder's files are unchanged afterwards;
6. a checkpoint write that fails half way (disk full): save_checkpoint, and the trainer (more in
   tests/test_faults.py: every reader and writer, a real full disk, a write killed mid-way).

More bad-input tests live next to their feature: tests/test_config.py, test_cli.py,
test_train.py (CLI config errors, an interrupted save, a non-finite loss), test_helper.py,
test_gather.py, test_ema.py, test_optim.py, test_attention.py (each op's own table and the
forced-backend refusals), test_data_loader.py (bad files in every data backend),
test_data_verify.py, test_eval.py and test_plot.py.
"""

import copy
import errno
import hashlib
import io
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import enospc_torch_save
from imagefiles import undecodable_jpeg, write_bad_files, write_colour_images

import fastjepa.helper as helper
from fastjepa.cli import main as cli
from fastjepa.config import ConfigError, apply_override, load_yaml, validate
from fastjepa.data.loader import backend_problem
from fastjepa.helper import CheckpointError, init_model, init_opt, load_checkpoint, read_checkpoint, save_checkpoint
from fastjepa.ops import BackendError, adamw_ema_, ema_update_, gather_tokens, pos_tokens, shared_context_attention, use_backend, varlen_attention
from fastjepa.train import fit

# The smallest run: 4 x 4 patches of 8 px, a 1-block predictor, batch 2 over the 12 embedded photos.
SMALL = dict(crop_size=32, patch_size=8, batch_size=2, repeat=1, pred_depth=1, min_keep=0, epochs=1, warmup=1, progress=False)
LATEST = "jepa-latest.pth.tar"
NO_DALI = backend_problem("dali", torch.device("cpu"))


def files_of(folder) -> dict:
    """name -> sha256 of the checkpoints and training logs in folder: equal before and after, nothing was lost."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.suffix in (".tar", ".csv")}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run folder holding the checkpoint of one training step, with the checkpoint's dict and bytes."""
    folder = tmp_path_factory.mktemp("saved-run")
    fit(out=folder, max_steps=1, **SMALL)
    raw = (folder / LATEST).read_bytes()
    return SimpleNamespace(folder=folder, checkpoint=folder / LATEST, state=torch.load(io.BytesIO(raw), weights_only=True), raw=raw)


@pytest.fixture
def run_copy(saved_run, tmp_path):
    """A copy of the saved run to resume from or write into."""
    return Path(shutil.copytree(saved_run.folder, tmp_path / "run"))


# --------------------------------------------------------------------------- 1. the command line


@pytest.fixture(scope="module")
def paths(tmp_path_factory, saved_run):
    """Files the command lines below point at."""
    root = tmp_path_factory.mktemp("cli")
    p = SimpleNamespace(root=root, checkpoint=str(saved_run.checkpoint), missing=str(root / "missing"))
    for name, text in (("bad_yaml", "data: [unclosed\n"), ("list_yaml", "- 1\n- 2\n"), ("unknown_yaml", "data:\n  batchsize: 3\n"),
                       ("text", "not an image\n")):
        setattr(p, name, str(root / f"{name}.txt"))
        Path(getattr(p, name)).write_text(text)
    p.empty = str(root / "empty")
    os.mkdir(p.empty)
    p.images = str(root / "images")
    write_colour_images(p.images, 2)
    return p


def run_cli(argv) -> int:
    """The exit code of ``fastjepa ARGV`` run in this process (argparse exits with SystemExit)."""
    try:
        return cli(argv)
    except SystemExit as exit:
        return exit.code


TRAIN = ["train", "--no-progress", "--max-steps", "1"]  # a case that wrongly passes trains one step, not the preset

CLI_CASES = [
    # (id, argv from paths, exit code, what the last line of stderr must hold)
    ("no-command", lambda p: [], 2, r"required: COMMAND"),
    ("unknown-command", lambda p: ["nosuch"], 2, r"invalid choice: 'nosuch'"),
    ("max-steps-0", lambda p: ["train", "--max-steps", "0"], 2, r"argument --max-steps: must be >= 1, got 0"),
    ("checkpoint-every-negative", lambda p: ["train", "--checkpoint-every", "-3"], 2, r"argument --checkpoint-every: must be >= 1, got -3"),
    ("profile-steps-reversed", lambda p: ["train", "--profile-steps", "5:2"], 2, r"--profile-steps takes A:B with 0 <= A < B, got '5:2'"),
    ("seed-not-int", lambda p: ["train", "--seed", "x"], 2, r"argument --seed: invalid int value: 'x'"),
    ("set-unknown-key", lambda p: [*TRAIN, "--set", "meta.nosuch=1"], 2, r"unknown key meta\.nosuch"),
    ("set-no-section", lambda p: [*TRAIN, "--set", "batch_size=4"], 2, r"--set takes section\.key=value, got 'batch_size=4'"),
    ("set-bad-yaml", lambda p: [*TRAIN, "--set", "data.crop_scale=[0.3"], 2, r"--set data\.crop_scale: cannot parse '\[0\.3'"),
    ("set-negative-lr", lambda p: [*TRAIN, "--set", "optimization.lr=-1", "--dry-run"], 2, r"optimization\.lr must be > 0, got -1"),
    ("config-missing", lambda p: [*TRAIN, "--config", p.missing], 2, r"cannot read config .*missing: No such file"),
    ("config-a-folder", lambda p: [*TRAIN, "--config", p.empty], 2, r"cannot read config .*empty: Is a directory"),
    ("config-not-yaml", lambda p: [*TRAIN, "--config", p.bad_yaml], 2, r"config .*bad_yaml\.txt is not valid YAML"),
    ("config-a-list", lambda p: [*TRAIN, "--config", p.list_yaml], 2, r"must hold a mapping of sections, got list"),
    ("config-unknown-key", lambda p: [*TRAIN, "--config", p.unknown_yaml], 2, r"unknown key data\.batchsize; data keys are"),
    ("resume-missing", lambda p: [*TRAIN, "--resume", p.missing, "--out", str(p.root / "run-a")], 1, r"checkpoint not found: .*missing"),
    ("data-empty", lambda p: [*TRAIN, "--set", f"data.root_path={p.empty}", "--out", str(p.root / "run-b")], 1,
     r"empty dataset: no images under .*empty"),
    ("data-a-file", lambda p: [*TRAIN, "--set", f"data.root_path={p.text}", "--out", str(p.root / "run-c")], 1,
     r"image folder .*text\.txt.* is not a directory"),
    ("data-missing", lambda p: [*TRAIN, "--set", f"data.root_path={p.missing}", "--out", str(p.root / "run-d")], 1,
     r"image folder .*missing.* does not exist"),
    ("plot-missing", lambda p: ["plot", p.missing], 1, r"run folder not found: .*missing"),
    ("plot-no-log", lambda p: ["plot", p.empty], 1, r"no training log '\*_r0\.csv'"),
    ("eval-unknown-method", lambda p: ["eval", "svm", "--checkpoint", p.checkpoint], 2, r"invalid choice: 'svm'"),
    ("eval-no-checkpoint", lambda p: ["eval", "knn"], 2, r"one of the arguments --checkpoint --weights is required"),
    ("eval-k-0", lambda p: ["eval", "knn", "--checkpoint", p.checkpoint, "--k", "0"], 2, r"argument --k: must be >= 1, got 0"),
    ("eval-missing-checkpoint", lambda p: ["eval", "knn", "--checkpoint", p.missing], 1, r"checkpoint not found: .*missing"),
    ("eval-data-without-splits", lambda p: ["eval", "knn", "--checkpoint", p.checkpoint, "--data", p.empty], 1,
     r"data folder .*empty lacks train/ and val/"),
    ("eval-other-image-size", lambda p: ["eval", "knn", "--checkpoint", p.checkpoint, "--image-size", "48"], 1,
     r"the encoder was trained at \d+ px; --image-size 48"),
    ("data-no-action", lambda p: ["data"], 2, r"required: ACTION"),
    ("verify-missing", lambda p: ["data", "verify", p.missing, "--workers", "1"], 1, r"'.*missing' does not exist"),
    ("verify-a-file", lambda p: ["data", "verify", p.text + os.sep, "--workers", "1"], 1, r"text\.txt/' is not a directory"),
    ("verify-no-images", lambda p: ["data", "verify", p.empty, "--workers", "1"], 1, r"no image files under .*empty"),
    ("verify-move-inside", lambda p: ["data", "verify", p.images, "--move-to", os.path.join(p.images, "aside"), "--workers", "1"], 1,
     r"the folder for bad files .*aside' is inside"),
    ("verify-workers-0", lambda p: ["data", "verify", p.images, "--workers", "0"], 2, r"argument --workers: must be >= 1, got 0"),
    ("max-steps-not-int", lambda p: ["train", "--max-steps", "abc"], 2, r"argument --max-steps: must be an integer >= 1, got 'abc'"),
    ("device-unknown", lambda p: [*TRAIN, "--device", "nope", "--out", str(p.root / "run-e")], 1, r"device 'nope' is not a device"),
    ("resume-checkpoint-a-folder", lambda p: [*TRAIN, "--resume", p.empty, "--out", str(p.root / "run-f")], 1,
     r"checkpoint .*empty is a directory, not a checkpoint file"),
    ("resume-other-model-size", lambda p: [*TRAIN, "--resume", p.checkpoint, "--out", str(p.root / "run-g"), "--set", "meta.model_name=vit_small",
                                           "--set", "meta.pred_emb_dim=96"], 1, r"'encoder' does not fit the model: .*size mismatch.*more problems"),
    ("submit-without-out", lambda p: ["submit", "--max-steps", "1"], 2, r"needs --out DIR"),
]


@pytest.mark.parametrize("argv, code, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli(paths, capsys, argv, code, message):
    assert run_cli(argv(paths)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and re.search(message, err[-1]), err
    if not err[0].startswith("usage:"):  # argparse prints its usage first; our own errors are one line
        assert len(err) == 1 and err[0].startswith(f"fastjepa {argv(paths)[0]}"), err


def test_cli_resume_of_a_truncated_checkpoint_exits_1_and_keeps_it(run_copy, capsys):
    (run_copy / LATEST).write_bytes((run_copy / LATEST).read_bytes()[:4096])
    before = files_of(run_copy)
    assert run_cli([*TRAIN, "--out", str(run_copy), "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(rf"cannot read checkpoint .*{LATEST} \(truncated or corrupt\?\)", err[0]), err
    assert files_of(run_copy) == before


# --------------------------------------------------------------------------------- 2. the config

CONFIG_CASES = [
    # (id, config, what the message must hold)
    ("unknown-section", {"optimisation": {"lr": 1e-3}}, r"unknown section 'optimisation'; sections are data, logging"),
    ("unknown-key", {"optimization": {"learning_rate": 1e-3}}, r"unknown key optimization\.learning_rate; optimization keys are"),
    ("not-a-mapping", [{"data": {}}], r"a config must be a mapping of sections .*, got list"),
    ("section-not-a-mapping", {"data": [64]}, r"section data must be a mapping of keys, got list"),
    ("batch_size-str", {"data": {"batch_size": "64"}}, r"data\.batch_size must be an integer, got '64' \(str\)"),
    ("crop_size-float", {"data": {"crop_size": 2.5}}, r"data\.crop_size must be an integer, got 2\.5"),
    ("pin_mem-str", {"data": {"pin_mem": "yes"}}, r"data\.pin_mem must be true or false, got 'yes'"),
    ("root_path-int", {"data": {"root_path": 3}}, r"data\.root_path must be a path \(string\), got 3 \(int\)"),
    ("lr-str", {"optimization": {"lr": "0.001"}}, r"optimization\.lr must be a number, got '0\.001' \(str\)"),
    ("lr-inf", {"optimization": {"lr": float("inf")}}, r"optimization\.lr must be a number, got inf"),
    ("model_name-int", {"meta": {"model_name": 3}}, r"meta\.model_name must be a string, got 3 \(int\)"),
    ("model_name-unknown", {"meta": {"model_name": "vit_enormous"}}, r"meta\.model_name must be one of vit_tiny, .*got 'vit_enormous'"),
    ("aspect_ratio-one-number", {"mask": {"aspect_ratio": [0.75]}}, r"mask\.aspect_ratio must be a list of two numbers"),
    ("ema-str", {"optimization": {"ema": [0.996, "1"]}}, r"optimization\.ema must be a list of two numbers"),
    ("crop_size-indivisible", {"data": {"crop_size": 100}, "mask": {"patch_size": 16}}, r"data\.crop_size 100 must be divisible by mask\.patch_size 16"),
    ("lr-negative", {"optimization": {"lr": -1e-3}}, r"optimization\.lr must be > 0, got -0\.001"),
    ("final_lr-negative", {"optimization": {"final_lr": -1e-6}}, r"optimization\.final_lr must be >= 0"),
    ("weight_decay-negative", {"optimization": {"weight_decay": -0.04}}, r"optimization\.weight_decay must be >= 0"),
    ("epochs-0", {"optimization": {"epochs": 0}}, r"optimization\.epochs must be >= 1, got 0"),
    ("warmup-negative", {"optimization": {"warmup": -1}}, r"optimization\.warmup must be >= 0 epochs"),
    ("ipe_scale-0", {"optimization": {"ipe_scale": 0}}, r"optimization\.ipe_scale must be > 0"),
    ("aspect_ratio-reversed", {"mask": {"aspect_ratio": [1.5, 0.75]}}, r"mask\.aspect_ratio must be \[min, max\] with 0 < min <= max, got \[1\.5, 0\.75\]"),
    ("enc_mask_scale-reversed", {"mask": {"enc_mask_scale": [1.0, 0.85]}}, r"mask\.enc_mask_scale must be \[min, max\] with 0 < min <= max <= 1"),
    ("crop_scale-reversed", {"data": {"crop_scale": [1.0, 0.3]}}, r"data\.crop_scale must be \[min, max\] with 0 < min <= max <= 1"),
    ("ema-above-1", {"optimization": {"ema": [0.996, 1.5]}}, r"optimization\.ema must be \[start, end\] with 0 <= start <= end <= 1"),
    ("num_workers-negative", {"data": {"num_workers": -1}}, r"data\.num_workers must be >= 0, got -1"),
    ("repeat-0", {"data": {"repeat": 0}}, r"data\.repeat must be >= 1"),
    ("backend-unknown", {"data": {"backend": "PIL"}}, r"data\.backend must be one of auto, dali, torchvision, pil, got 'PIL'"),
    ("write_tag-empty", {"logging": {"write_tag": ""}}, r"logging\.write_tag must be a non-empty name"),
    ("pred_emb_dim-98", {"meta": {"pred_emb_dim": 98}}, r"meta\.pred_emb_dim must be a multiple of 4"),
    ("pred_depth-0", {"meta": {"pred_depth": 0}}, r"meta\.pred_depth must be >= 1"),
    ("num_pred_masks-0", {"mask": {"num_pred_masks": 0}}, r"mask\.num_pred_masks must be >= 1"),
    ("min_keep-too-large", {"mask": {"min_keep": 300}}, r"mask: min_keep must be an int in \[0, 256\)"),
]


@pytest.mark.parametrize("config, message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_validate(config, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate(config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("assignment, message", [
    ("batch_size=4", r"--set takes section\.key=value, got 'batch_size=4'"),
    ("data.batchsize=4", r"unknown key data\.batchsize; known: backend, batch_size"),
    ("nosuch.key=1", r"unknown key nosuch\.key; known: data\.backend"),
    ("data.crop_scale=[0.3", r"--set data\.crop_scale: cannot parse"),
])
def test_apply_override(assignment, message):
    config = {}
    with pytest.raises(ConfigError, match=message):
        apply_override(config, assignment)
    assert config == {}


@pytest.mark.parametrize("content, message", [
    (None, r"cannot read config .*: No such file or directory"),
    ("data: [unclosed\n", r"is not valid YAML: while parsing"),
    ("42\n", r"must hold a mapping of sections, got int"),
    ("", r"must hold a mapping of sections, got NoneType"),
], ids=["missing", "broken", "scalar", "empty"])
def test_load_yaml(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_yaml(path)


@pytest.mark.parametrize("keys, message", [
    (dict(nosuch=1), r"unknown config key 'nosuch'"),
    (dict(batch_size="2"), r"data\.batch_size must be an integer"),
    (dict(lr=-1.0), r"optimization\.lr must be > 0"),
    (dict(max_steps=0), r"max_steps must be >= 1, got 0"),
    (dict(checkpoint_every=-1), r"checkpoint_every must be >= 1, got -1"),
])
def test_fit_keys(tmp_path, keys, message):
    with pytest.raises(ConfigError, match=message):
        fit(out=tmp_path / "run", **{**SMALL, **keys})
    assert not list(tmp_path.rglob("*.pth.tar"))


# ------------------------------------------------------------------------------------- 3. the ops


def op_inputs() -> SimpleNamespace:
    """Fresh random, valid inputs for every op; each bad case below breaks one thing."""
    B, D, K = 2, 8, 3
    N = int(torch.randint(5, 10, ()))
    s = SimpleNamespace(N=N, D=D)
    s.x, s.pos = torch.randn(B, N, D), torch.randn(N, D)
    s.idx = torch.stack([torch.randperm(N)[:K] for _ in range(B)]).int()  # unique within each sample
    lengths = torch.randint(1, N + 1, (B,)).tolist()
    s.flat = torch.cat([torch.randperm(N)[:n] for n in lengths]).int()
    s.cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    s.base = torch.randn(B, K, D)
    s.targets, s.onlines = [torch.randn(3), torch.randn(2, 4)], [torch.randn(3), torch.randn(2, 4)]
    s.adam = dict(params=[torch.randn(3), torch.randn(2, 4)], grads=[torch.randn(3), torch.randn(2, 4)],
                  exp_avgs=[torch.zeros(3), torch.zeros(2, 4)], exp_avg_sqs=[torch.zeros(3), torch.zeros(2, 4)],
                  step=torch.zeros(()), lr=float(torch.rand(())) * 1e-3, weight_decay=0.05)
    T = int(torch.randint(6, 11, ()))
    s.q, s.k, s.v = (torch.randn(T, 2, 8) for _ in range(3))
    split = int(torch.randint(1, T, ()))
    s.cu_qkv = torch.tensor([0, split, T], dtype=torch.int32)  # two sequences
    s.offsets = torch.tensor([[0, split, split + 1, T]], dtype=torch.int32)  # a context and two blocks (the last may be empty)
    s.T = T
    return s


def adam(s, **changes):
    return adamw_ema_(**{**s.adam, **changes})


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


OP_CASES = [
    # (id, call on op_inputs(), error, what the message must hold)
    ("gather/x-int", lambda s: gather_tokens(s.x.long(), s.idx, s.pos),
     TypeError, r"gather_tokens: x must be float16, bfloat16, float32 or float64, got torch\.int64"),
    ("gather/x-list", lambda s: gather_tokens(s.x.tolist(), s.idx, s.pos), TypeError, r"gather_tokens: x must be a tensor, got list"),
    ("gather/idx-float", lambda s: gather_tokens(s.x, s.idx.float(), s.pos), TypeError, r"idx must be int32 or int64, got torch\.float32"),
    ("gather/idx-int16", lambda s: gather_tokens(s.x, s.idx.short(), s.pos), TypeError, r"idx must be int32 or int64, got torch\.int16"),
    ("gather/pos-int", lambda s: gather_tokens(s.x, s.idx, s.pos.long()), TypeError, r"pos must be float16, .* got torch\.int64"),
    ("gather/x-meta", lambda s: gather_tokens(s.x.to("meta"), s.idx, s.pos), ValueError, r"different devices: x on meta, idx on cpu, pos on cpu"),
    ("gather/pos-meta", lambda s: gather_tokens(s.x, s.idx, s.pos.to("meta")), ValueError, r"different devices: .*pos on meta"),
    ("gather/x-2d", lambda s: gather_tokens(s.x[0], s.idx, s.pos), ValueError, r"x must be \(B, N, D\), got shape \(\d+, 8\)"),
    ("gather/idx-3d", lambda s: gather_tokens(s.x, s.idx[None], s.pos), ValueError, r"idx must be \(R, K\) .*got shape \(1, 2, 3\)"),
    ("gather/pos-width", lambda s: gather_tokens(s.x, s.idx, s.pos[:, :5]),
     ValueError, r"pos must be \(N, 8\) or \(1, N, 8\) \(D = x\.shape\[-1\]\), got \(\d+, 5\)"),
    ("gather/pos-rows", lambda s: gather_tokens(s.x, s.idx, s.pos[:3]), ValueError, r"pos has 3 rows but x has \d+ tokens"),
    ("gather/rows", lambda s: gather_tokens(s.x, s.idx[:1], s.pos),
     ValueError, r"number of rows \(1\) must be a positive multiple of the batch size \(2\)"),
    ("gather/idx-high", lambda s: gather_tokens(s.x, s.idx + s.N, s.pos), IndexError, r"indices must lie in \[0, \d+\), got values from \d+ to \d+"),
    ("gather/idx-negative", lambda s: gather_tokens(s.x, s.idx - s.N, s.pos), IndexError, r"indices must lie in \[0, \d+\), got values from -\d+"),
    ("packed/cu-int64", lambda s: gather_tokens(s.x, s.flat, None, s.cu.long()),
     ValueError, r"cu_seqlens must be int32 \(R \+ 1,\) .*got torch\.int64"),
    ("packed/cu-2d", lambda s: gather_tokens(s.x, s.flat, None, s.cu[None]), ValueError, r"cu_seqlens must be int32 \(R \+ 1,\) .*\(1, 3\)"),
    ("packed/cu-start", lambda s: gather_tokens(s.x, s.flat, None, s.cu + 1), ValueError, r"cu_seqlens must start at 0"),
    ("packed/cu-decreasing", lambda s: gather_tokens(s.x, s.flat, None, i32([0, len(s.flat), 0, len(s.flat), len(s.flat)])),
     ValueError, r"never decrease"),
    ("packed/cu-end", lambda s: gather_tokens(s.x, s.flat, None, torch.cat([s.cu[:-1], s.cu[-1:] - 1])),
     ValueError, r"end at the number of tokens \(\d+\)"),
    ("packed/cu-rows", lambda s: gather_tokens(s.x, s.flat, None, s.cu[[0, 2]]), ValueError, r"number of rows \(1\) must be a positive multiple"),
    ("packed/idx-2d", lambda s: gather_tokens(s.x, s.idx, None, i32([0, 3, 6])),
     ValueError, r"with cu_seqlens, idx must be flat \(T,\), got shape \(2, 3\)"),
    ("packed/cu-meta", lambda s: gather_tokens(s.x, s.flat, None, s.cu.to("meta")), ValueError, r"different devices: .*cu_seqlens on meta"),
    ("packed/idx-high", lambda s: gather_tokens(s.x, s.flat + s.N, None, s.cu), IndexError, r"indices must lie in \[0, \d+\)"),
    ("pos_tokens/base-0d", lambda s: pos_tokens(s.base[0, 0, 0], s.idx, s.pos),
     ValueError, r"pos_tokens: base must be \(D,\) or idx\.shape \+ \(D,\), got a 0-d tensor"),
    ("pos_tokens/base-shape", lambda s: pos_tokens(s.base[:, :2], s.idx, s.pos),
     ValueError, r"base must be \(D,\) or idx\.shape \+ \(D,\) = \(2, 3, 8\), got \(2, 2, 8\)"),
    ("pos_tokens/pos-none", lambda s: pos_tokens(s.base, s.idx, None), TypeError, r"pos_tokens: pos must be a tensor, got NoneType"),
    ("pos_tokens/pos-width", lambda s: pos_tokens(s.base[0, 0, :7], s.idx, s.pos),
     ValueError, r"pos must be \(N, 7\) or \(1, N, 7\) \(D = base\.shape\[-1\]\), got \(\d+, 8\)"),
    ("pos_tokens/base-strided", lambda s: pos_tokens(s.base.transpose(0, 1).contiguous().transpose(0, 1), s.idx, s.pos),
     ValueError, r"base must be contiguous, got strides"),
    ("pos_tokens/idx-float", lambda s: pos_tokens(s.base, s.idx.float(), s.pos), TypeError, r"idx must be int32 or int64, got torch\.float32"),
    ("pos_tokens/idx-high", lambda s: pos_tokens(s.base, s.idx + s.N, s.pos), IndexError, r"pos_tokens: indices must lie in \[0, \d+\)"),
    ("pos_tokens/base-meta", lambda s: pos_tokens(s.base.to("meta"), s.idx, s.pos), ValueError, r"different devices: base on meta"),
    ("ema/lengths", lambda s: ema_update_(s.targets, s.onlines[:1], 0.9), ValueError, r"ema_update_: 2 target tensors but 1 online tensors"),
    ("ema/shape", lambda s: ema_update_(s.targets, [s.onlines[0], s.onlines[1].t()], 0.9),
     ValueError, r"onlines\[1\] has shape \(4, 2\) but targets\[1\] has \(2, 4\)"),
    ("ema/device", lambda s: ema_update_(s.targets, [s.onlines[0].to("meta"), s.onlines[1]], 0.9), ValueError,
     r"onlines\[0\] is on meta but targets\[0\] is on cpu"),
    ("ema/target-int", lambda s: ema_update_([s.targets[0].long(), s.targets[1]], s.onlines, 0.9),
     TypeError, r"targets\[0\] must be a float tensor, got torch\.int64"),
    ("ema/not-a-tensor", lambda s: ema_update_(s.targets, [0.5, s.onlines[1]], 0.9), TypeError, r"onlines\[0\] is a float, not a tensor"),
    ("ema/one-tensor", lambda s: ema_update_(s.targets[1], s.onlines[1], 0.9),
     TypeError, r"targets must be a sequence of tensors, got a single tensor"),
    ("ema/none", lambda s: ema_update_(None, s.onlines, 0.9), TypeError, r"targets must be a sequence of tensors, got NoneType"),
    ("ema/momentum-high", lambda s: ema_update_(s.targets, s.onlines, 1 + float(torch.rand(())) + 1e-3),
     ValueError, r"momentum must be in \[0, 1\], got \d"),
    ("ema/momentum-nan", lambda s: ema_update_(s.targets, s.onlines, float("nan")), ValueError, r"momentum must be in \[0, 1\], got nan"),
    ("ema/momentum-str", lambda s: ema_update_(s.targets, s.onlines, "0.9"), TypeError, r"momentum must be a number or a tensor, got str"),
    ("ema/momentum-1d", lambda s: ema_update_(s.targets, s.onlines, torch.full((2,), 0.9)),
     ValueError, r"momentum must be a float or a 0-d float tensor, got torch\.float32 of shape \(2,\)"),
    ("ema/momentum-meta", lambda s: ema_update_(s.targets, s.onlines, torch.tensor(0.9, device="meta")),
     ValueError, r"momentum is on meta but the tensors are on cpu"),
    ("ema/shadows-count", lambda s: ema_update_(s.targets, s.onlines, 0.9, s.targets[:1]), ValueError, r"1 shadow tensors for 2 targets"),
    ("ema/shadow-int", lambda s: ema_update_(s.targets, s.onlines, 0.9, [torch.zeros(3, dtype=torch.int32), torch.zeros(2, 4)]), TypeError,
     r"shadows\[0\] must be a float tensor, got torch\.int32"),
    ("adamw/lengths", lambda s: adam(s, grads=s.adam["grads"][:1]), ValueError, r"adamw_ema_: 1 grads for 2 params"),
    ("adamw/step-int", lambda s: adam(s, step=torch.zeros((), dtype=torch.int64)),
     ValueError, r"step must be a 0-d float tensor .*got torch\.int64 of shape \(\)"),
    ("adamw/step-1d", lambda s: adam(s, step=torch.zeros(1)), ValueError, r"step must be a 0-d float tensor .*of shape \(1,\)"),
    ("adamw/shape", lambda s: adam(s, exp_avgs=[torch.zeros(3), torch.zeros(4, 2)]),
     ValueError, r"exp_avgs\[1\] has shape \(4, 2\) but params\[1\] has \(2, 4\)"),
    ("adamw/dtype", lambda s: adam(s, grads=[s.adam["grads"][0].double(), s.adam["grads"][1]]),
     TypeError, r"grads\[0\] is torch\.float64 but params\[0\] is torch\.float32"),
    ("adamw/device", lambda s: adam(s, grads=[s.adam["grads"][0], s.adam["grads"][1].to("meta")]),
     ValueError, r"grads\[1\] is on meta but step is on cpu"),
    ("adamw/one-tensor", lambda s: adam(s, params=s.adam["params"][0]), TypeError, r"params must be a sequence of tensors, got a single tensor"),
    ("adamw/lr-negative", lambda s: adam(s, lr=-s.adam["lr"]), ValueError, r"lr must be finite and >= 0, got -"),
    ("adamw/lr-str", lambda s: adam(s, lr="1e-3"), TypeError, r"lr must be a number or a tensor, got str"),
    ("adamw/lr-2d", lambda s: adam(s, lr=torch.full((2, 2), 1e-3)),
     ValueError, r"lr must be a float or a 0-d or 1-D float tensor, got torch\.float32 of shape \(2, 2\)"),
    ("adamw/weight-decay-nan", lambda s: adam(s, weight_decay=float("nan")), ValueError, r"weight_decay must be finite and >= 0, got nan"),
    ("adamw/group-range", lambda s: adam(s, groups=[0, 1]), ValueError, r"group indices must lie in \[0, 1\) .*got \[0, 1\]"),
    ("adamw/group-float", lambda s: adam(s, groups=[0, 0.5]), TypeError, r"groups must hold int group indices, got 0\.5 \(float\)"),
    ("adamw/betas-three", lambda s: adam(s, betas=(0.9, 0.99, 0.9)), ValueError, r"betas must be a pair of numbers \(beta1, beta2\)"),
    ("adamw/betas-one", lambda s: adam(s, betas=(0.9, 1.0)), ValueError, r"betas must lie in \[0, 1\), got \(0\.9, 1\.0\)"),
    ("adamw/eps-negative", lambda s: adam(s, eps=-1e-8), ValueError, r"eps must be finite and >= 0, got -1e-08"),
    ("adamw/momentum-high", lambda s: adam(s, targets=s.targets, momentum=1.5), ValueError, r"momentum must be in \[0, 1\], got 1\.5"),
    ("adamw/targets-no-momentum", lambda s: adam(s, targets=s.targets), ValueError, r"targets need a momentum"),
    ("adamw/shadows-no-targets", lambda s: adam(s, shadows=s.targets), ValueError, r"shadows need targets"),
    ("varlen/q-int", lambda s: varlen_attention(s.q.long(), s.k, s.v, s.cu_qkv, s.T),
     TypeError, r"varlen_attention: q must be a float tensor, got torch\.int64"),
    ("varlen/dtypes", lambda s: varlen_attention(s.q, s.k.half(), s.v, s.cu_qkv, s.T),
     TypeError, r"q, k and v must have one dtype, got torch\.float32, torch\.float16"),
    ("varlen/shapes", lambda s: varlen_attention(s.q, s.k[:, :1], s.v, s.cu_qkv, s.T), ValueError, r"q, k and v must have one shape"),
    ("varlen/q-2d", lambda s: varlen_attention(s.q[:, 0], s.k, s.v, s.cu_qkv, s.T),
     ValueError, r"q must be packed \(total_tokens, heads, head_dim\), got shape \(\d+, 8\)"),
    ("varlen/k-meta", lambda s: varlen_attention(s.q, s.k.to("meta"), s.v, s.cu_qkv, s.T),
     ValueError, r"q, k and v must be on one device, got cpu, meta, cpu"),
    ("varlen/heads-0", lambda s: varlen_attention(s.q[:, :0], s.k[:, :0], s.v[:, :0], s.cu_qkv, s.T),
     ValueError, r"heads and head_dim must be positive"),
    ("varlen/cu-int64", lambda s: varlen_attention(s.q, s.k, s.v, s.cu_qkv.long(), s.T),
     ValueError, r"cu_seqlens must be a 1-D int32 tensor .*got torch\.int64"),
    ("varlen/cu-list", lambda s: varlen_attention(s.q, s.k, s.v, s.cu_qkv.tolist(), s.T),
     ValueError, r"cu_seqlens must be a 1-D int32 tensor .*got list"),
    ("varlen/cu-meta", lambda s: varlen_attention(s.q, s.k, s.v, s.cu_qkv.to("meta"), s.T), ValueError, r"cu_seqlens is on meta but q is on cpu"),
    ("varlen/cu-start", lambda s: varlen_attention(s.q, s.k, s.v, s.cu_qkv + 1, s.T), ValueError, r"cu_seqlens must start at 0"),
    ("varlen/cu-decreasing", lambda s: varlen_attention(s.q, s.k, s.v, i32([0, s.T, 1, s.T]), s.T), ValueError, r"never decrease"),
    ("varlen/cu-end", lambda s: varlen_attention(s.q, s.k, s.v, i32([0, 1, s.T + 1]), s.T + 1), ValueError, r"end at total_tokens \(\d+\)"),
    ("varlen/max-seqlen-small", lambda s: varlen_attention(s.q, s.k, s.v, i32([0, s.T]), s.T - 1),
     ValueError, r"max_seqlen \d+ is smaller than a sequence in cu_seqlens"),
    ("varlen/max-seqlen-float", lambda s: varlen_attention(s.q, s.k, s.v, s.cu_qkv, float(s.T)),
     ValueError, r"max_seqlen must be a non-negative Python int, got \d+\.0"),
    ("varlen/max-seqlen-negative", lambda s: varlen_attention(s.q, s.k, s.v, s.cu_qkv, -1),
     ValueError, r"max_seqlen must be a non-negative Python int, got -1"),
    ("varlen/scale-nan", lambda s: varlen_attention(s.q, s.k, s.v, s.cu_qkv, s.T, float("nan")),
     ValueError, r"softmax_scale must be finite, got nan"),
    ("varlen/scale-str", lambda s: varlen_attention(s.q, s.k, s.v, s.cu_qkv, s.T, "0.1"),
     TypeError, r"softmax_scale must be a number or None, got str"),
    ("shared/offsets-int64", lambda s: shared_context_attention(s.q, s.k, s.v, s.offsets.long(), s.T),
     ValueError, r"offsets must be an int32 \(B, M \+ 2\) tensor .*got torch\.int64"),
    ("shared/offsets-1d", lambda s: shared_context_attention(s.q, s.k, s.v, s.offsets[0], s.T),
     ValueError, r"offsets must be an int32 \(B, M \+ 2\) tensor .*\(4,\)"),
    ("shared/no-block", lambda s: shared_context_attention(s.q, s.k, s.v, i32([[0, s.T]]), s.T),
     ValueError, r"with B >= 1 and M >= 1, got torch\.int32 \(1, 2\)"),
    ("shared/offsets-meta", lambda s: shared_context_attention(s.q, s.k, s.v, s.offsets.to("meta"), s.T),
     ValueError, r"offsets is on meta but q is on cpu"),
    ("shared/unchained", lambda s: shared_context_attention(s.q, s.k, s.v, i32([[0, 1, 2], [3, 4, s.T]]), s.T), ValueError, r"chain the samples"),
    ("shared/end", lambda s: shared_context_attention(s.q, s.k, s.v, i32([[0, 1, 2, s.T - 1]]), s.T), ValueError, r"end at total_tokens \(\d+\)"),
    ("shared/decreasing", lambda s: shared_context_attention(s.q, s.k, s.v, i32([[0, 2, 1, s.T]]), s.T), ValueError, r"never decrease"),
    ("shared/max-seqlen-small", lambda s: shared_context_attention(s.q, s.k, s.v, i32([[0, 1, 2, s.T]]), 1),
     ValueError, r"max_seqlen 1 is smaller than a context or block"),
    ("shared/v-int", lambda s: shared_context_attention(s.q, s.k, s.v.int(), s.offsets, s.T),
     TypeError, r"v must be a float tensor, got torch\.int32"),
]


def tensors_in(value) -> list:
    """Every tensor in a nest of namespaces, dicts and lists."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, SimpleNamespace):
        value = vars(value)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [t for item in items for t in tensors_in(item)]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_op(backend, call, error, message):
    """Validation comes before the backend's choice: the same error on every backend, and nothing written."""
    s = op_inputs()
    before = [t.clone() for t in tensors_in(s)]
    with use_backend(backend), pytest.raises(error, match=message) as raised:
        call(s)
    assert "\n" not in str(raised.value)
    assert all(torch.equal(t, b) for t, b in zip(tensors_in(s), before))


STRIDED_CASES = [
    # (id, op on views, the same op on contiguous copies)
    ("gather/x-pos-idx", lambda s: gather_tokens(s.xt.transpose(1, 2), s.idx2[:, ::2], s.pos2[:, ::2]),
     lambda s: gather_tokens(s.xt.transpose(1, 2).contiguous(), s.idx2[:, ::2].contiguous(), s.pos2[:, ::2].contiguous())),
    ("packed/cu-idx", lambda s: gather_tokens(s.x, torch.stack([s.flat, s.flat], 1)[:, 0], None, torch.stack([s.cu, s.cu], 1)[:, 0]),
     lambda s: gather_tokens(s.x, s.flat, None, s.cu)),
    ("pos_tokens/one-row", lambda s: pos_tokens(s.row2[::2], s.idx, s.pos), lambda s: pos_tokens(s.row2[::2].contiguous(), s.idx, s.pos)),
    ("varlen/fused-qkv", lambda s: varlen_attention(*s.qkv.unbind(1), torch.stack([s.cu_qkv, s.cu_qkv], 1)[:, 1], s.T),
     lambda s: varlen_attention(*(t.contiguous() for t in s.qkv.unbind(1)), s.cu_qkv, s.T)),
]


@pytest.mark.parametrize("strided, contiguous", [c[1:] for c in STRIDED_CASES], ids=[c[0] for c in STRIDED_CASES])
@pytest.mark.filterwarnings("ignore:torch.searchsorted.*non-contiguous")
def test_strided_inputs_give_the_contiguous_result(backend, strided, contiguous):
    s = op_inputs()
    s.xt, s.idx2 = torch.randn(2, s.D, s.N), torch.stack([s.idx, s.idx], 2).reshape(2, -1)
    s.pos2, s.row2 = torch.randn(s.N, 2 * s.D), torch.randn(2 * s.D)
    s.qkv = torch.randn(s.T, 3, 2, 8)
    with use_backend(backend):
        assert torch.equal(strided(s), contiguous(s))


@pytest.mark.parametrize("op", ["ema_update_", "adamw_ema_"])
def test_strided_state_is_updated_like_contiguous_state_or_refused_by_name(backend, op):
    """The torch backends take any strides; a kernel that needs contiguous tensors says so."""
    base = [torch.randn(4, 3), torch.randn(3)]
    views = [base[0].t(), base[1]]  # a transposed (non-contiguous) target or parameter
    copies = [v.contiguous() for v in views]
    onlines = [torch.randn(3, 4), torch.randn(3)]
    m = float(torch.rand(()))

    def update(tensors):
        if op == "ema_update_":
            ema_update_(tensors, onlines, m)
        else:
            adamw_ema_(tensors, onlines, [torch.zeros_like(o) for o in onlines], [torch.zeros_like(o) for o in onlines],
                       torch.zeros(()), 1e-3, 0.05)

    if op == "adamw_ema_" and backend == "triton":
        pytest.skip("adamw_ema_ has no triton implementation")
    with use_backend("torch"):
        update(copies)
    with use_backend(backend):
        try:
            update(views)
        except BackendError as refused:
            assert backend != "torch" and "needs contiguous tensors" in str(refused), refused
            return
    assert all(torch.equal(v, c) for v, c in zip(views, copies))


# ------------------------------------------------------------------------------ 4. image folders


def make_folder(kind, root: Path) -> str:
    folder = root / kind
    folder.mkdir()
    if kind == "non-images":
        (folder / "notes.txt").write_text("not an image")
        (folder / "labels.csv").write_text("a,b\n")
    elif kind == "unreadable":
        bad = write_bad_files(folder)
        os.remove(bad["undecodable.jpg"])  # a header-checked folder is then all rejected before training
    elif kind == "undecodable":
        for i in range(3):
            (folder / f"{i}.jpg").write_bytes(undecodable_jpeg())  # complete files, damaged inside
    elif kind == "too-few":
        write_colour_images(folder, 1)
    return str(folder)


NEEDS_DALI = pytest.mark.skipif(bool(NO_DALI), reason=f"dali backend: {NO_DALI}")
DATA_CASES = [
    # (kind of folder, data backend, error, what the message must hold)
    pytest.param("empty", "pil", ValueError, r"empty dataset: no images under '{root}", id="empty"),
    pytest.param("non-images", "pil", ValueError, r"empty dataset: no images under '{root}.*\(looked for extensions \.jpg", id="non-images"),
    pytest.param("unreadable", "pil", ValueError, r"none of the 4 image files under '{root}.*' decodes \(e\.g\. .*\); `fastjepa data verify",
                 id="unreadable-pil"),
    pytest.param("undecodable", "pil", ValueError, r"none of the 3 image files under '{root}.*' decodes \(e\.g\. .*broken data stream",
                 id="undecodable-pil"),
    pytest.param("unreadable", "dali", ValueError, r"no readable image under '{root}.*all 4 image files fail the header check",
                 marks=NEEDS_DALI, id="unreadable-dali"),
    pytest.param("undecodable", "dali", ValueError, r"DALI can decode none of the 3 images under '{root}", marks=NEEDS_DALI, id="undecodable-dali"),
    pytest.param("too-few", "pil", ConfigError, r"data\.batch_size 2 is larger than the 1 images of an epoch in {root}", id="fewer-than-a-batch"),
    pytest.param("missing", "pil", FileNotFoundError, r"image folder '{root}.*' does not exist", id="missing"),
]


@pytest.mark.parametrize("kind, data_backend, error, message", DATA_CASES)
def test_bad_image_folder_stops_training_before_any_checkpoint(tmp_path, kind, data_backend, error, message):
    root = make_folder(kind, tmp_path) if kind != "missing" else str(tmp_path / "missing")
    with pytest.raises(error, match=message.format(root=re.escape(root))) as raised:
        fit(out=tmp_path / "run", root_path=root, backend=data_backend, **SMALL)
    assert "\n" not in str(raised.value)
    assert not list(tmp_path.rglob("*.pth.tar"))  # no checkpoint of a model that trained on nothing


def test_a_file_given_as_the_image_folder(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"image folder '.*photo\.jpg/?' is not a directory"):
        fit(out=tmp_path / "run", root_path=str(tmp_path / "photo.jpg"), **SMALL)


@pytest.mark.parametrize("data_backend", ["pil", pytest.param("dali", marks=NEEDS_DALI)])
def test_a_folder_of_good_and_bad_files_trains_and_counts_the_bad_ones(tmp_path, capsys, data_backend):
    good = write_colour_images(tmp_path / "data", 4)
    bad = write_bad_files(tmp_path / "data")
    result = fit(out=tmp_path / "run", root_path=str(tmp_path / "data"), backend=data_backend, **SMALL)
    per_epoch = (len(good) + len(bad)) // SMALL["batch_size"] * SMALL["batch_size"]  # files read: whole batches only
    assert result.skipped_images >= len(bad) - (len(good) + len(bad) - per_epoch)
    assert 1 <= result.steps <= per_epoch // SMALL["batch_size"]
    assert f"unreadable images skipped: {result.skipped_images}" in capsys.readouterr().out
    assert read_checkpoint(result.latest_checkpoint)["epoch"] == 1


# --------------------------------------------------------------------------------- 5. checkpoints


def without(state, *keys):
    return {k: v for k, v in state.items() if k not in keys}


BAD_CHECKPOINTS = {
    # kind: (its content from the good checkpoint's dict and bytes, what the message must hold)
    "truncated": (lambda state, raw: raw[: len(raw) // 2], r"cannot read checkpoint {path} \(truncated or corrupt\?\)"),
    "random-bytes": (lambda state, raw: os.urandom(4096), r"cannot read checkpoint {path} \(truncated or corrupt\?\): not a torch file"),
    "empty": (lambda state, raw: b"", r"checkpoint {path} is empty \(0 bytes\)"),
    "not-a-dict": (lambda state, raw: [torch.randn(3)], r"checkpoint {path} holds a list, expected a dict"),
    "missing-models": (lambda state, raw: without(state, "encoder", "target_encoder"),
                       r"checkpoint {path} lacks encoder, target_encoder; it has predictor"),
    "optimizer-mismatch": (lambda state, raw: {**state, "opt": {"state": {}, "param_groups": []}},
                           r"checkpoint {path}: 'opt' does not fit the optimizer"),
}
UNREADABLE = ("truncated", "random-bytes", "empty", "not-a-dict")


@pytest.fixture
def bad_checkpoint(request, saved_run, tmp_path):
    content, message = BAD_CHECKPOINTS[request.param]
    path = tmp_path / "bad" / f"{request.param}.pth.tar"
    path.parent.mkdir()
    data = content(saved_run.state, saved_run.raw)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        torch.save(data, path)
    return SimpleNamespace(kind=request.param, path=path, message=message.format(path=re.escape(str(path))))


@pytest.mark.parametrize("bad_checkpoint", UNREADABLE, indirect=True)
def test_read_checkpoint(bad_checkpoint):
    with pytest.raises(CheckpointError, match=bad_checkpoint.message):
        read_checkpoint(bad_checkpoint.path)


@pytest.mark.parametrize("bad_checkpoint", list(BAD_CHECKPOINTS), indirect=True)
def test_load_checkpoint(bad_checkpoint):
    encoder, predictor = init_model("cpu", patch_size=8, model_name="vit_tiny", crop_size=32, pred_depth=1, pred_emb_dim=96)
    target = copy.deepcopy(encoder)
    optimizer = init_opt(encoder, predictor, 6, 2e-4, 1e-3, 1, 1)[0]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(CheckpointError, match=bad_checkpoint.message):
        load_checkpoint("cpu", bad_checkpoint.path, encoder, predictor, target, optimizer, None)
    if bad_checkpoint.kind != "optimizer-mismatch":  # checked before any model is loaded: the models are as they were
        assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("bad_checkpoint", list(BAD_CHECKPOINTS), indirect=True)
def test_fit_resume_from_a_bad_checkpoint_keeps_the_run(bad_checkpoint, run_copy):
    before = files_of(run_copy)
    with pytest.raises(CheckpointError, match=bad_checkpoint.message):
        fit(out=run_copy, resume=str(bad_checkpoint.path), max_steps=1, **SMALL)
    assert files_of(run_copy) == before


@pytest.mark.parametrize("entry, value", [("itr", None), ("fastjepa", [1, 2]), ("epoch", "three")])
def test_fit_resume_from_a_malformed_progress_entry_keeps_the_run(saved_run, run_copy, entry, value):
    state = copy.deepcopy(saved_run.state)
    if entry == "itr":
        del state["fastjepa"]["itr"]
    elif entry == "fastjepa":
        state["fastjepa"] = value
    else:  # a reference checkpoint (no fastjepa entry) whose epoch is not a number
        del state["fastjepa"]
        state["epoch"] = value
    bad = run_copy / "malformed.pth.tar"
    torch.save(state, bad)
    before = files_of(run_copy)
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(bad))}: its '(fastjepa|epoch)' entry is malformed"):
        fit(out=run_copy, resume=str(bad), max_steps=1, **SMALL)
    assert files_of(run_copy) == before


def test_fit_resume_into_another_model_size_keeps_the_run(run_copy):
    before = files_of(run_copy)
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(run_copy / LATEST))}: 'encoder' does not fit the model"):
        fit(out=run_copy, resume="latest", max_steps=1, **{**SMALL, "model_name": "vit_small"})
    assert files_of(run_copy) == before


@pytest.mark.parametrize("bad_checkpoint", ["truncated", "empty", "not-a-dict", "missing-models"], indirect=True)
def test_eval_cli_exits_1_naming_the_checkpoint(bad_checkpoint, capsys):
    assert run_cli(["eval", "knn", "--checkpoint", str(bad_checkpoint.path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # eval reads any weights (fastjepa.weights.read_weights): a checkpoint without its encoders is not weights at all
    message = bad_checkpoint.message if bad_checkpoint.kind != "missing-models" else "holds neither a training checkpoint .* nor a state dict"
    assert len(err) == 1 and err[0].startswith("fastjepa eval: ") and re.search(message, err[0]), err


# ------------------------------------------------------------- 6. a checkpoint write that fails half way


def failing(error_number):
    def fail(*args, **kwargs):
        raise OSError(error_number, os.strerror(error_number))

    return fail


@pytest.mark.parametrize("where", ["torch.save", "os.fsync", "os.replace"])
def test_save_checkpoint_failing_half_way_keeps_the_previous_file(tmp_path, monkeypatch, where):
    path = tmp_path / LATEST
    previous = {"encoder": {"w": torch.randn(64, 32)}, "epoch": int(torch.randint(1, 100, ()))}
    save_checkpoint(previous, path)
    before = path.read_bytes()
    number = errno.EIO if where == "os.replace" else errno.ENOSPC
    patch = {"torch.save": (helper.torch, "save", enospc_torch_save()), "os.fsync": (helper.os, "fsync", failing(number)),
             "os.replace": (helper.os, "replace", failing(number))}[where]
    monkeypatch.setattr(*patch)
    new = {"encoder": {"w": torch.randn(64, 32)}, "epoch": previous["epoch"] + 1}
    with pytest.raises(OSError) as raised:
        save_checkpoint(new, path)
    with pytest.raises(OSError):
        save_checkpoint(new, tmp_path / "first.pth.tar")  # no previous file: none is left half written
    monkeypatch.undo()
    assert raised.value.errno == number
    assert path.read_bytes() == before and os.listdir(tmp_path) == [LATEST]  # no temporary file left
    loaded = read_checkpoint(path)
    assert loaded["epoch"] == previous["epoch"] and torch.equal(loaded["encoder"]["w"], previous["encoder"]["w"])


def test_training_whose_second_save_fails_keeps_the_first_checkpoint_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(helper.torch, "save", enospc_torch_save(calls_before=1))
    with pytest.raises(OSError) as raised:
        fit(out=tmp_path, max_steps=3, checkpoint_every=1, **SMALL)  # saves after steps 1, 2 and 3
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert not list(tmp_path.glob(".*.tmp"))
    first = read_checkpoint(tmp_path / LATEST)
    assert (first["epoch"], first["fastjepa"]["itr"]) == (0, 1)  # the checkpoint of step 1, whole
    resumed = fit(out=tmp_path, resume="latest", max_steps=1, **SMALL)
    assert resumed.steps == 1 and read_checkpoint(tmp_path / LATEST)["fastjepa"]["itr"] == 2


def test_cli_training_on_a_full_disk_exits_1_in_one_line_keeping_the_first_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(helper.torch, "save", enospc_torch_save(calls_before=1))
    argv = ["train", "--no-progress", "--out", str(tmp_path), "--max-steps", "3", "--checkpoint-every", "1",
            "--set", "data.batch_size=4", "--set", "data.crop_size=48", "--set", "data.repeat=1", "--set", "meta.pred_depth=1",
            "--set", "mask.min_keep=1"]
    assert run_cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    latest = re.escape(str(tmp_path / LATEST))
    assert len(err) == 1 and re.fullmatch(rf"fastjepa train: no space left on the device while writing {latest} \(it needs about .*, .* free\); "
                                          rf"the previous checkpoint {latest} \(epoch 0, step 1\) is kept: .*--resume {latest}", err[0]), err
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / LATEST)["fastjepa"]["itr"] == 1
