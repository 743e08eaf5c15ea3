"""fastjepa.weights and `fastjepa export`: the hf, timm and safetensors formats out and back in,
against transformers' own IJepaModel (CPU, fp32) and timm's naming rules; `eval --weights` and
`meta.init_weights`; bad input.

Tolerance: transformers' IJepaModel and fastjepa's encoder compute the same fp32 ops in
another order (separate q/k/v matmuls, their attention), so their outputs agree to a relative
error of 1e-5 (measured: about 1e-7); the preprocessor to 1e-5 (float rounding of the same
PIL resize and crop). Exported and re-imported tensors are compared bit for bit."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_jepa_models
from PIL import Image

pytest.importorskip("safetensors")  # a core dependency; gpu_check.sh installs fastjepa without its dependencies

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fastjepa import weights as fw  # noqa: E402
from fastjepa.cli import main as cli  # noqa: E402
from fastjepa.config import tiny_preset  # noqa: E402
from fastjepa.data.images import make_eval_transform  # noqa: E402
from fastjepa.data.normalize import normalize  # noqa: E402
from fastjepa.helper import CheckpointError, init_model, save_checkpoint  # noqa: E402

FORMATS = {"hf": "hf", "timm": "w.safetensors", "safetensors": "w.safetensors"}


def run_cli(argv) -> int:
    try:
        return cli(argv)
    except SystemExit as exit:
        return exit.code


@pytest.fixture(scope="module")
def models():
    """A ViT-Tiny/8 at 32 px (12 blocks) and its predictor; the target differs from the context encoder."""
    encoder, predictor, target = tiny_jepa_models()
    return encoder.eval(), predictor, target.eval()


def prefixed(model):
    return {f"module.{k}": v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def checkpoint(models, tmp_path_factory):
    """A fastjepa-style checkpoint: DDP's module. prefixes."""
    encoder, predictor, target = models
    path = tmp_path_factory.mktemp("ckpt") / "jepa-latest.pth.tar"
    save_checkpoint({"encoder": prefixed(encoder), "predictor": prefixed(predictor), "target_encoder": prefixed(target), "epoch": 2}, path)
    return path


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def exported_tensors(path) -> dict:
    path = str(path)
    return load_file(os.path.join(path, fw.HF_WEIGHTS) if os.path.isdir(path) else path)


def no_leftovers(folder) -> bool:
    return not [name for name in os.listdir(folder) if name.endswith(".tmp")]


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("format", list(FORMATS))
def test_export_import_export_is_bit_identical(format, checkpoint, models, tmp_path):
    if format == "hf":
        pytest.importorskip("transformers")
    first, second = tmp_path / "first" / FORMATS[format], tmp_path / "second" / FORMATS[format]
    fw.export_weights(checkpoint, format, first)
    state, shape = fw.read_weights(first)
    assert shape == fw.EncoderShape("vit_tiny", 8, 32)
    assert same_tensors(state, models[2].state_dict())  # the target encoder, by default
    fw.export_weights(fw.load_encoder(first), format, second)
    assert same_tensors(exported_tensors(first), exported_tensors(second))
    if format == "hf":
        for name in ("config.json", "preprocessor_config.json"):
            assert (first / name).read_text() == (second / name).read_text()
    assert no_leftovers(first.parent) and no_leftovers(second.parent)


def test_the_context_encoder_and_a_reference_checkpoint_without_prefixes(models, tmp_path):
    encoder, predictor, target = models
    path = tmp_path / "IN1K-vit.t.8-300e.pth.tar"
    save_checkpoint({"encoder": encoder.state_dict(), "predictor": predictor.state_dict(), "target_encoder": target.state_dict(),
                     "epoch": 300}, path)
    fw.export_weights(path, "safetensors", tmp_path / "context.safetensors", encoder="context")
    assert same_tensors(fw.read_weights(tmp_path / "context.safetensors")[0], encoder.state_dict())
    with safe_open(str(tmp_path / "context.safetensors"), "pt") as f:
        metadata = json.loads(f.metadata()["fastjepa"])
    assert metadata == {"format": "safetensors", "model_name": "vit_tiny", "patch_size": 8, "crop_size": 32, "encoder": "context",
                        "source": str(path)}
    assert same_tensors(fw.read_weights(path, encoder="context")[0], encoder.state_dict())


# ---------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf_folder(checkpoint, tmp_path_factory):
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "ijepa-tiny"
    assert run_cli(["export", str(checkpoint), "--format", "hf", "--out", str(folder)]) == 0
    return folder


def test_hf_folder_loads_without_missing_or_unexpected_keys_and_matches_fastjepa(hf_folder, models):
    from transformers import IJepaModel

    model, info = IJepaModel.from_pretrained(hf_folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"] and not info["error_msgs"], info
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (192, 12, 3, 768)
    assert (config.image_size, config.patch_size, config.layer_norm_eps, config.hidden_act) == (32, 8, 1e-6, "gelu")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model.eval()(pixel_values=images).last_hidden_state
        ours = models[2](images)
    assert torch.isfinite(theirs).all() and theirs.shape == ours.shape == (3, 16, 192)
    assert ((theirs - ours).norm() / ours.norm()).item() <= 1e-5


def test_hf_image_classifier_takes_the_backbone_and_reads_back(hf_folder, models, tmp_path):
    from transformers import IJepaForImageClassification

    model, info = IJepaForImageClassification.from_pretrained(hf_folder, num_labels=5, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"] and not info["unexpected_keys"], info
    model.save_pretrained(tmp_path / "classifier")
    assert same_tensors(fw.read_weights(tmp_path / "classifier")[0], models[2].state_dict())
    # the README's fine-tuning example, one step
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(hf_folder)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)) for i in range(2)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss = model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"], labels=torch.tensor([0, 3])).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and model.classifier.weight.grad.abs().sum() > 0


def test_hf_preprocessor_is_the_eval_transform(hf_folder):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(hf_folder)
    rng = np.random.default_rng(2)
    for width, height in ((50, 41), (41, 77), (32, 32), (33, 90)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        theirs = processor(images=image, return_tensors="pt")["pixel_values"]
        ours = normalize(make_eval_transform(32)(image)[None])
        assert theirs.shape == ours.shape == (1, 3, 32, 32)
        assert (theirs - ours).abs().max().item() <= 1e-5


def test_hf_layout_read_off_the_installed_model_covers_a_deeper_one():
    transformers = pytest.importorskip("transformers")
    whole, per_layer = fw._hf_layout()
    config = transformers.IJepaConfig(hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=12, image_size=8, patch_size=4)
    expected = set(transformers.IJepaModel(config).state_dict())
    mapped = {whole["pos_embed"]} | {f"{whole[m]}.{p}" for m in ("patch_embed.proj", "norm") for p in ("weight", "bias")}
    mapped |= {f"{name.format(i=i)}.{p}" for i in range(3) for name in per_layer.values() for p in ("weight", "bias")}
    assert mapped == expected


def test_an_untested_transformers_version_is_refused_and_nothing_is_written(checkpoint, tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(transformers, "__version__", "4.46.0")
    assert run_cli(["export", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    message = capsys.readouterr().err.strip()
    assert "transformers 4.46.0 is not a version" in message and "pip install 'transformers>=5,<6'" in message and "\n" not in message
    assert os.listdir(tmp_path) == []


def write_hf_config(folder, **changes):
    with open(folder / "config.json") as f:
        config = json.load(f)
    config.update(changes)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "vit"}, "config.json has model_type 'vit'; fastjepa reads IJepa models"),
    ({"hidden_size": 200}, "an IJepa model of width 200, depth 12, 3 heads and MLP size 768 is no fastjepa model"),
    ({"num_attention_heads": 4}, "4 heads and MLP size 768 is no fastjepa model"),
    ({"layer_norm_eps": 1e-12}, "layer_norm_eps 1e-12 (fastjepa's is 1e-06)"),
])
def test_an_hf_folder_fastjepa_has_no_model_for(hf_folder, tmp_path, capsys, changes, message):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    write_hf_config(folder, **changes)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fw.read_weights(folder)
    assert run_cli(["eval", "knn", "--weights", str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# ---------------------------------------------------------------------------- timm


def timm_keys(depth: int, width: int, hidden: int, patch: int, tokens: int) -> dict:
    """The state dict timm's VisionTransformer has with class_token=False, global_pool='avg',
    fc_norm=False, num_classes=0, qkv_bias=True and no layer scale (timm's naming): every
    module that would carry another tensor (cls_token, norm_pre, fc_norm, head, ls1/ls2) is
    absent or an Identity."""
    keys = {"patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,), "pos_embed": (1, tokens, width)}
    for i in range(depth):
        for name, shape in (("norm1", (width,)), ("attn.qkv", (3 * width, width)), ("attn.proj", (width, width)), ("norm2", (width,)),
                            ("mlp.fc1", (hidden, width)), ("mlp.fc2", (width, hidden))):
            keys[f"blocks.{i}.{name}.weight"] = shape
            keys[f"blocks.{i}.{name}.bias"] = (shape[0],)
    keys.update({"norm.weight": (width,), "norm.bias": (width,)})
    return keys


def test_timm_file_follows_timms_naming_and_checkpoint_filter_rules(checkpoint, tmp_path, capsys):
    out = tmp_path / "vit_tiny.safetensors"
    assert run_cli(["export", str(checkpoint), "--format", "timm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model('vit_base_patch16_gap_224', num_classes=0, pretrained=True, patch_size=8, embed_dim=192, num_heads=3, " \
           f"img_size=32, pretrained_cfg_overlay={{'file': '{out}', 'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)}})" in printed
    state = load_file(str(out))
    assert {k: tuple(v.shape) for k, v in state.items()} == timm_keys(12, 192, 768, 8, 16)
    # checkpoint_filter_fn: no 'encoder' entry (it would keep only module.-prefixed keys under it), no 'mask_token'
    # (it would convert from DINOv2), no 'model' / 'state_dict' wrapper; a square grid with no prefix tokens
    assert not {"encoder", "mask_token", "model", "state_dict"} & set(state) and not any(k.startswith("module.") for k in state)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in state.values())
    with safe_open(str(out), "pt") as f:
        metadata = json.loads(f.metadata()["fastjepa"])
    assert metadata["timm_model"] == "vit_base_patch16_gap_224" and metadata["timm_kwargs"] == {
        "patch_size": 8, "embed_dim": 192, "num_heads": 3, "img_size": 32}


@pytest.mark.parametrize("shape, name, kwargs", [
    (fw.EncoderShape("vit_huge", 14, 224), "vit_huge_patch14_gap_224", {}),
    (fw.EncoderShape("vit_huge", 16, 448), "vit_huge_patch16_gap_448", {}),
    (fw.EncoderShape("vit_giant", 16, 224), "vit_giant_patch16_gap_224", {}),
    (fw.EncoderShape("vit_base", 16, 224), "vit_base_patch16_gap_224", {"num_heads": 12}),
    (fw.EncoderShape("vit_huge", 14, 448), "vit_huge_patch14_gap_224", {"img_size": 448}),
    (fw.EncoderShape("vit_large", 16, 224), "vit_base_patch16_gap_224", {"embed_dim": 1024, "depth": 24}),
])
def test_timm_model_for_each_shape(shape, name, kwargs):
    assert fw.timm_model(shape) == (name, kwargs)


def test_timm_create_line_for_vit_h14_is_the_published_one():
    line = fw.timm_create_line("/w/vith14.safetensors", fw.EncoderShape("vit_huge", 14, 224))
    assert line.startswith("timm.create_model('vit_huge_patch14_gap_224', num_classes=0, pretrained=True, "
                           "pretrained_cfg_overlay={'file': '/w/vith14.safetensors'")


def import_timm():
    try:
        import timm
    except Exception as e:  # ImportError, or torchvision's RuntimeError beside the CPU torch wheel
        pytest.skip(f"timm does not import here ({type(e).__name__}: {str(e).splitlines()[0][:120]}); the GPU check runs this test")
    return timm


@pytest.mark.parametrize("name", list(fw.TIMM_GAP_MODELS))
def test_timm_builds_the_same_tensors_for_the_ijepa_shapes(name):
    timm = import_timm()
    args = fw.TIMM_GAP_MODELS[name]
    shape = fw.EncoderShape({768: "vit_base", 1280: "vit_huge", 1408: "vit_giant"}[args["embed_dim"]], args["patch_size"], args["img_size"])
    _, kwargs = fw.timm_model(shape)
    with torch.device("meta"):
        theirs = timm.create_model(name, num_classes=0, pretrained=False, **kwargs).state_dict()
        ours = shape.build().state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}


def test_timm_loads_the_export_and_computes_fastjepa_features(checkpoint, models, tmp_path):
    timm = import_timm()
    out = tmp_path / "vit_tiny.safetensors"
    fw.export_weights(checkpoint, "timm", out)
    name, kwargs = fw.timm_model(fw.EncoderShape("vit_tiny", 8, 32))
    model = timm.create_model(name, num_classes=0, pretrained=True, pretrained_cfg_overlay={"file": str(out)}, **kwargs).eval()
    assert same_tensors(model.state_dict(), models[2].state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert ((model.forward_features(images) - models[2](images)).norm() / models[2](images).norm()).item() <= 1e-5


# ---------------------------------------------------------------------------- bad input


def test_bad_export_input_is_one_line_and_writes_nothing(checkpoint, models, tmp_path, capsys):
    encoder, predictor, _ = models
    context_only = tmp_path / "context-only.pth.tar"
    save_checkpoint({"encoder": encoder.state_dict(), "predictor": predictor.state_dict(), "epoch": 1}, context_only)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cases = [
        (["--format", "onnx", "--out", str(tmp_path / "x")], 2, "unknown --format 'onnx'; choose one of hf, timm, safetensors"),
        (["--format", "hf", "--encoder", "ema", "--out", str(tmp_path / "x")], 2, "unknown --encoder 'ema'; choose one of target, context"),
        (["--format", "hf", "--out", str(out)], 1, "is a folder that is not empty; pass --force"),
        (["--format", "timm", "--out", str(tmp_path / "w.pth")], 1, "the timm format writes a .safetensors file"),
    ]
    for argv, code, message in cases:
        assert run_cli(["export", str(checkpoint), *argv]) == code
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert run_cli(["export", str(context_only), "--format", "safetensors", "--out", str(tmp_path / "t.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert "lacks 'target_encoder' (the target encoder)" in err and "\n" not in err
    assert sorted(os.listdir(tmp_path)) == ["context-only.pth.tar", "out"] and os.listdir(out) == ["keep.txt"]


def test_a_failed_write_keeps_the_previous_export(checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import safetensors.torch

    out = tmp_path / "hf"
    fw.export_weights(checkpoint, "hf", out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        fw.export_weights(checkpoint, "hf", out, encoder="context", force=True)
    with pytest.raises(OSError, match="No space left"):
        fw.export_weights(checkpoint, "safetensors", tmp_path / "w.safetensors")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["hf"]


def test_force_replaces_an_export(checkpoint, models, tmp_path):
    out = tmp_path / "w.safetensors"
    fw.export_weights(checkpoint, "safetensors", out)
    with pytest.raises(FileExistsError, match="exists; pass --force"):
        fw.export_weights(checkpoint, "safetensors", out, encoder="context")
    fw.export_weights(checkpoint, "safetensors", out, encoder="context", force=True)
    assert same_tensors(load_file(str(out)), models[0].state_dict()) and no_leftovers(tmp_path)


def test_unreadable_weights_are_named(tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="cannot read .*cut.safetensors"):
        fw.read_weights(tmp_path / "cut.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="folder without config.json"):
        fw.read_weights(tmp_path / "empty")
    torch.save({"weights": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="neither a training checkpoint .* nor a state dict of tensors"):
        fw.read_weights(tmp_path / "list.pth")
    torch.save({"pos_embed": torch.zeros(1, 16, 200), "patch_embed.proj.weight": torch.zeros(200, 3, 8, 8)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="width 200 and depth 0 is no fastjepa model"):
        fw.read_weights(tmp_path / "odd.pth")


# ---------------------------------------------------------------------------- eval and train


def test_eval_weights_gives_the_checkpoints_result(checkpoint, tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "w.safetensors"
    fw.export_weights(checkpoint, "safetensors", out)
    assert run_cli(["eval", "knn", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    from_checkpoint = json.loads((tmp_path / "a" / "knn.json").read_text())
    assert run_cli(["eval", "knn", "--weights", str(out), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    from_weights = json.loads((tmp_path / "b" / "knn.json").read_text())
    for key in ("top1", "heads", "weights_sha256"):
        assert from_weights[key] == from_checkpoint[key], key


def tiny_run_config(tmp_path, **meta):
    config = tiny_preset()
    config["meta"].update(meta)
    config["logging"]["folder"] = str(tmp_path / "run")
    return config


def test_init_weights_starts_both_encoders_from_them_and_the_predictor_fresh(tmp_path):
    from fastjepa.train import set_up

    torch.manual_seed(5)
    config = tiny_preset()
    source, _ = init_model("cpu", config["mask"]["patch_size"], "vit_tiny", config["data"]["crop_size"], 1, 48)
    fw.export_weights(source, "safetensors", tmp_path / "init.safetensors")
    fresh = set_up(tiny_run_config(tmp_path / "a"), torch.device("cpu"), None, 0, None, False)
    run = set_up(tiny_run_config(tmp_path / "b", init_weights=str(tmp_path / "init.safetensors")), torch.device("cpu"), None, 0, None, False)
    assert same_tensors(run.model.encoder.state_dict(), source.state_dict())
    assert same_tensors(run.target_encoder.state_dict(), source.state_dict())
    assert same_tensors(run.model.predictor.state_dict(), fresh.model.predictor.state_dict())  # same seed: the fresh init
    assert not same_tensors(fresh.model.encoder.state_dict(), source.state_dict())


def test_init_weights_of_another_shape_is_named(models, tmp_path):
    from fastjepa.train import set_up

    fw.export_weights(models[2], "safetensors", tmp_path / "at32.safetensors")
    with pytest.raises(CheckpointError, match="holds a vit_tiny/8 encoder at 32 px; the config trains vit_tiny/8 at 64 px"):
        set_up(tiny_run_config(tmp_path, init_weights=str(tmp_path / "at32.safetensors")), torch.device("cpu"), None, 0, None, False)


def test_a_resume_overrides_init_weights_and_dry_run_names_them(tmp_path, capsys):
    from fastjepa.train import main

    config = tiny_run_config(tmp_path)
    main(copy.deepcopy(config), max_steps=1, progress=False)
    config["meta"]["init_weights"] = str(tmp_path / "gone.safetensors")
    main(copy.deepcopy(config), max_steps=2, resume="latest", progress=False)  # the missing file is never read
    assert run_cli(["train", "--dry-run", "--set", f"meta.init_weights={tmp_path / 'gone.safetensors'}"]) == 0
    assert "gone.safetensors (not found): encoder and target encoder start from them" in capsys.readouterr().out
