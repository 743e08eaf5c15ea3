"""An encoder's weights out of fastjepa and back in: Hugging Face transformers, timm, safetensors.

Formats (``FORMATS``):
* ``hf``: a folder ``transformers.IJepaModel.from_pretrained(PATH)`` loads: ``config.json``,
  ``model.safetensors`` and a ``preprocessor_config.json`` with the evaluation resize and crop
  and ImageNet's mean and std. The key mapping is read off the installed transformers' own
  ``IJepaModel`` (a two-layer probe), so a renamed layout is detected, not guessed.
* ``timm``: a ``.safetensors`` state dict for timm's ``*_gap_*`` ViTs (no class token, average
  pooling); ``timm_model`` names the timm model and the arguments that build it.
* ``safetensors``: the encoder's state dict under fastjepa's (and the reference's) own key
  names, with a ``fastjepa`` JSON metadata entry.

timm's key names for these models are fastjepa's, so the ``timm`` and ``safetensors`` files hold
the same tensors; the ``timm`` format checks that timm has a model for the shape and records it.

Any of them, or a training checkpoint (fastjepa's or the reference's, with or without DDP's
``module.`` prefix), reads back with ``read_weights`` / ``load_encoder``. The model's shape
(name, patch size, crop size) is read off the weights themselves.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from fastjepa.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from fastjepa.files import replaced_atomically, space_needed
from fastjepa.helper import CheckpointError, first_problem, read_checkpoint
from fastjepa.models import vision_transformer as vit

FORMATS = ("hf", "timm", "safetensors")
ENCODERS = {"target": "target_encoder", "context": "encoder"}  # --encoder -> the training checkpoint's entry
TESTED_TRANSFORMERS_MAJOR = 5  # the IJepaModel layout this module was checked against (5.24.0)
LAYER_NORM_EPS = 1e-6  # fastjepa's (and the reference's) LayerNorm eps; transformers' default is 1e-12
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"

# timm's I-JEPA-shaped models (class_token=False, global_pool="avg", fc_norm=False): their
# builder arguments and default image size (timm/models/vision_transformer.py).
TIMM_GAP_MODELS = {
    "vit_huge_patch14_gap_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, img_size=224),
    "vit_huge_patch16_gap_448": dict(patch_size=16, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, img_size=448),
    "vit_giant_patch16_gap_224": dict(patch_size=16, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11, img_size=224),
    "vit_base_patch16_gap_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=16, mlp_ratio=4.0, img_size=224),
}


@dataclass(frozen=True)
class EncoderShape:
    model_name: str
    patch_size: int
    crop_size: int

    def build(self) -> vit.VisionTransformer:
        return getattr(vit, self.model_name)(img_size=[self.crop_size], patch_size=self.patch_size)

    def timm_args(self) -> dict:
        """Builder arguments of ours, under timm's names."""
        embed_dim, depth, num_heads, mlp_ratio = vit.VIT_SHAPES[self.model_name]
        return dict(patch_size=self.patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=float(mlp_ratio),
                    img_size=self.crop_size)


def _shape_names() -> str:
    return ", ".join(f"{name} {d}x{depth}" for name, (d, depth, _, _) in vit.VIT_SHAPES.items())


def shape_of(state: dict, source) -> EncoderShape:
    """The fastjepa shape of an encoder state dict (fastjepa's key names), from its tensors."""
    try:
        n_tokens, width = state["pos_embed"].shape[1:]
        patch = state["patch_embed.proj.weight"].shape[-1]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: not an I-JEPA encoder (no pos_embed / patch_embed.proj.weight of the right rank)") from e
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    names = [name for name, (d, n, _, _) in vit.VIT_SHAPES.items() if (d, n) == (width, depth)]
    if not names:
        raise CheckpointError(f"{source}: an encoder of width {width} and depth {depth} is no fastjepa model (those are {_shape_names()})")
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise CheckpointError(f"{source}: {n_tokens} position embeddings are not a square grid")
    return EncoderShape(names[0], int(patch), int(side * patch))


# ------------------------------------------------------------------------------- transformers


def _transformers():
    """The installed transformers, if its major version is the one tested; ImportError otherwise."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("the hf format needs transformers: pip install 'fastjepa[hf]'") from e
    major = int(transformers.__version__.split(".")[0])
    if major != TESTED_TRANSFORMERS_MAJOR:
        raise ImportError(f"transformers {transformers.__version__} is not a version fastjepa's hf format was tested with "
                          f"({TESTED_TRANSFORMERS_MAJOR}.x): pip install 'transformers>={TESTED_TRANSFORMERS_MAJOR},<{TESTED_TRANSFORMERS_MAJOR + 1}'")
    return transformers


_PROBE_LAYERS = 2


def _hf_layout() -> tuple[dict[str, str], dict[str, str]]:
    """``(whole, per_layer)``: fastjepa key -> IJepaModel key for the tensors outside the blocks,
    and for block 0 with ``{i}`` where the layer index goes. Read off a tiny IJepaModel: the
    modules its forward calls, in order, are patch conv, then per layer LayerNorm, q, k, v
    (named so), the attention's output, LayerNorm, fc1, fc2, then the final LayerNorm; the one
    parameter of no called module is the position table."""
    transformers = _transformers()
    config = transformers.IJepaConfig(hidden_size=16, num_hidden_layers=_PROBE_LAYERS, num_attention_heads=2, intermediate_size=24,
                                      image_size=8, patch_size=4, layer_norm_eps=LAYER_NORM_EPS)
    probe = transformers.IJepaModel(config, add_pooling_layer=False).eval()
    called = []
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: called.append(name))
             for name, module in probe.named_modules() if not list(module.children()) and list(module.parameters(recurse=False))]
    with torch.no_grad():
        probe(pixel_values=torch.zeros(1, 3, 8, 8))
    for hook in hooks:
        hook.remove()
    unknown = RuntimeError(f"transformers {transformers.__version__}'s IJepaModel has a layout fastjepa does not know (modules called: {called})")
    modules = dict(probe.named_modules())
    kinds = "".join("c" if isinstance(modules[n], torch.nn.Conv2d) else "n" if isinstance(modules[n], torch.nn.LayerNorm)
                    else "l" if isinstance(modules[n], torch.nn.Linear) else "?" for n in called)
    if kinds != "c" + "nllllnll" * _PROBE_LAYERS + "n":
        raise unknown
    whole = {"patch_embed.proj": called[0], "norm": called[-1]}
    layers = []
    for i in range(_PROBE_LAYERS):
        norm1, q, k, v, out, norm2, fc1, fc2 = called[1 + 8 * i: 9 + 8 * i]
        leaves = [name.rsplit(".", 1)[-1] for name in (q, k, v)]
        if leaves[0] not in ("q_proj", "query") or leaves[1] not in ("k_proj", "key") or leaves[2] not in ("v_proj", "value"):
            raise unknown
        layers.append({"norm1": norm1, "attn.q": q, "attn.k": k, "attn.v": v, "attn.proj": out, "norm2": norm2, "mlp.fc1": fc1, "mlp.fc2": fc2})
    per_layer = {ours: theirs.replace(".0.", ".{i}.", 1) for ours, theirs in layers[0].items()}
    if any(theirs.format(i=1) != layers[1][ours] for ours, theirs in per_layer.items()) or any("{i}" not in t for t in per_layer.values()):
        raise unknown
    params = [name for name, _ in probe.named_parameters()]
    owned = {f"{m}.{p}" for m in called for p in ("weight", "bias")}
    loose = [name for name in params if name not in owned]
    if len(loose) != 1 or set(probe.state_dict()) != set(params):
        raise unknown
    whole["pos_embed"] = loose[0]
    return whole, per_layer


def _to_hf(state: dict, depth: int) -> dict:
    whole, per_layer = _hf_layout()
    out = {whole["pos_embed"]: state["pos_embed"]}
    for ours in ("patch_embed.proj", "norm"):
        for p in ("weight", "bias"):
            out[f"{whole[ours]}.{p}"] = state[f"{ours}.{p}"]
    for i in range(depth):
        theirs = {ours: name.format(i=i) for ours, name in per_layer.items()}
        for p in ("weight", "bias"):
            for part, tensor in zip(("attn.q", "attn.k", "attn.v"), state[f"blocks.{i}.attn.qkv.{p}"].chunk(3)):
                out[f"{theirs[part]}.{p}"] = tensor.clone()  # safetensors stores no views into a shared tensor
            for ours in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{theirs[ours]}.{p}"] = state[f"blocks.{i}.{ours}.{p}"]
    return out


def _from_hf(hf_state: dict, depth: int, source) -> dict:
    whole, per_layer = _hf_layout()
    hf_state = dict(hf_state)
    taken = set()

    def take(name):
        if name not in hf_state:
            raise CheckpointError(f"{source}: lacks {name}")
        taken.add(name)
        return hf_state[name]

    state = {"pos_embed": take(whole["pos_embed"])}
    for ours in ("patch_embed.proj", "norm"):
        for p in ("weight", "bias"):
            state[f"{ours}.{p}"] = take(f"{whole[ours]}.{p}")
    for i in range(depth):
        theirs = {ours: name.format(i=i) for ours, name in per_layer.items()}
        for p in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([take(f"{theirs[part]}.{p}") for part in ("attn.q", "attn.k", "attn.v")])
            for ours in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                state[f"blocks.{i}.{ours}.{p}"] = take(f"{theirs[ours]}.{p}")
    extra = sorted(set(hf_state) - taken)
    if extra:
        raise CheckpointError(f"{source}: holds {len(extra)} tensors an IJepaModel of this config does not have, e.g. {extra[0]}")
    return {k: v.reshape(1, *v.shape[-2:]) if k == "pos_embed" else v for k, v in state.items()}


def _hf_config(shape: EncoderShape):
    transformers = _transformers()
    embed_dim, depth, num_heads, mlp_ratio = vit.VIT_SHAPES[shape.model_name]
    config = transformers.IJepaConfig(hidden_size=embed_dim, num_hidden_layers=depth, num_attention_heads=num_heads,
                                      intermediate_size=int(embed_dim * mlp_ratio), hidden_act="gelu", layer_norm_eps=LAYER_NORM_EPS,
                                      image_size=shape.crop_size, patch_size=shape.patch_size, num_channels=3, qkv_bias=True)
    config.architectures = ["IJepaModel"]
    return config


def _hf_image_processor(shape: EncoderShape):
    """fastjepa's evaluation transform (``make_eval_transform``) as transformers' processor: the
    shorter side resized bilinearly to round(crop * 256 / 224), the central crop, ImageNet's statistics."""
    transformers = _transformers()
    return transformers.BitImageProcessorPil(  # saved as BitImageProcessor: AutoImageProcessor picks a backend
        do_resize=True, size={"shortest_edge": round(shape.crop_size * 256 / 224)}, resample=2,
        do_center_crop=True, crop_size={"height": shape.crop_size, "width": shape.crop_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        do_convert_rgb=True)


def _shape_from_hf_config(config: dict, source) -> EncoderShape:
    if config.get("model_type") != "ijepa":
        raise CheckpointError(f"{source}: config.json has model_type {config.get('model_type')!r}; fastjepa reads IJepa models "
                              "(model_type 'ijepa')")
    problems = [f"{key} {config.get(key)!r} (fastjepa's is {want!r})" for key, want in
                (("hidden_act", "gelu"), ("qkv_bias", True), ("num_channels", 3)) if config.get(key, want) != want]
    if not math.isclose(config.get("layer_norm_eps", 1e-12), LAYER_NORM_EPS):
        problems.append(f"layer_norm_eps {config.get('layer_norm_eps', 1e-12)!r} (fastjepa's is {LAYER_NORM_EPS})")
    if problems:
        raise CheckpointError(f"{source}: config.json has " + "; ".join(problems))
    width, depth, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    names = [name for name, (d, n, h, r) in vit.VIT_SHAPES.items() if (d, n, h, int(d * r)) == (width, depth, heads, config["intermediate_size"])]
    if not names:
        raise CheckpointError(f"{source}: an IJepa model of width {width}, depth {depth}, {heads} heads and MLP size "
                              f"{config['intermediate_size']} is no fastjepa model (those are {_shape_names()})")
    image, patch = config["image_size"], config["patch_size"]
    if image % patch:
        raise CheckpointError(f"{source}: image_size {image} is not a multiple of patch_size {patch}")
    return EncoderShape(names[0], patch, image)


def _read_hf_folder(folder: str) -> tuple[dict, EncoderShape]:
    from safetensors.torch import load_file

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{folder} is a folder without config.json: not a Hugging Face model folder")
    with open(config_path) as f:
        config = json.load(f)
    shape = _shape_from_hf_config(config, folder)
    if os.path.isfile(os.path.join(folder, HF_WEIGHTS)):
        files = [HF_WEIGHTS]
    elif os.path.isfile(os.path.join(folder, HF_INDEX)):
        with open(os.path.join(folder, HF_INDEX)) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        raise CheckpointError(f"{folder} has neither {HF_WEIGHTS} nor {HF_INDEX}")
    hf_state = {}
    for name in files:
        hf_state.update(_load_safetensors(os.path.join(folder, name), load_file))
    prefixed = [k for k in hf_state if k.startswith("ijepa.")]  # an IJepaForImageClassification: its backbone
    if prefixed:
        hf_state = {k.removeprefix("ijepa."): v for k, v in hf_state.items() if k.startswith("ijepa.")}
    return _from_hf(hf_state, vit.VIT_SHAPES[shape.model_name][1], folder), shape


# ------------------------------------------------------------------------------- files


def _load_safetensors(path: str, load_file) -> dict:
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(f"cannot read {path} (truncated or not a safetensors file?): {first_problem(e)}") from e


def is_finetune_checkpoint(checkpoint: dict) -> bool:
    """Whether a torch file's dict is ``fastjepa finetune``'s checkpoint: one encoder, a head, its classes."""
    return "fastjepa_finetune" in checkpoint


def checkpoint_weights(checkpoint: dict, encoder: str, source) -> tuple[dict, EncoderShape]:
    """``(state, shape)`` of the encoder in a torch file's dict (see ``read_weights``)."""
    return _encoder_weights(_checkpoint_state(checkpoint, encoder, source), source)


def _encoder_weights(state: dict, source) -> tuple[dict, EncoderShape]:
    """An encoder state dict read from a file, without a classifier saved with it, and its shape."""
    state = {k: v for k, v in state.items() if k not in ("head.weight", "head.bias")}  # a timm classifier, if one was saved
    if "embeddings.position_embeddings" in state:
        raise CheckpointError(f"{source} is a Hugging Face model's weights file: pass its folder (with config.json) instead")
    return state, shape_of(state, source)


def _checkpoint_state(checkpoint: dict, encoder: str, source) -> dict:
    """The encoder state dict inside a torch file: a training checkpoint's entry (a fine-tuning
    checkpoint's one encoder, whichever is asked), or the file's own flat state dict (timm's
    ``.pth`` files, optionally under ``state_dict`` or ``model``)."""
    if is_finetune_checkpoint(checkpoint):
        state = checkpoint.get("encoder")
        if not isinstance(state, dict):
            raise CheckpointError(f"fine-tuning checkpoint {source} lacks its 'encoder'; it has {', '.join(map(str, checkpoint))}")
    elif "encoder" in checkpoint or "target_encoder" in checkpoint:
        entry = ENCODERS[encoder]
        if not isinstance(checkpoint.get(entry), dict):
            raise CheckpointError(f"checkpoint {source} lacks '{entry}' (the {encoder} encoder); it has {', '.join(map(str, checkpoint))}")
        state = checkpoint[entry]
    else:
        state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} holds neither a training checkpoint (encoder / target_encoder entries) nor a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_weights(path, encoder: str = "target") -> tuple[dict, EncoderShape]:
    """``(state, shape)``: an encoder state dict under fastjepa's key names, on the CPU, and its
    shape, from an hf folder, a ``.safetensors`` file (timm's or fastjepa's) or a torch file (a
    training checkpoint, whose ``encoder`` entry, ``"target"`` or ``"context"``, is taken, or a
    flat state dict). ``CheckpointError`` names what is wrong."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}; got {encoder!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_hf_folder(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        if not os.path.isfile(path):
            raise CheckpointError(f"weights not found: {path}")
        return _encoder_weights({k.removeprefix("module."): v for k, v in _load_safetensors(path, load_file).items()}, path)
    return checkpoint_weights(read_checkpoint(path), encoder, path)


def load_encoder(path, encoder: str = "target") -> vit.VisionTransformer:
    """The VisionTransformer whose weights are at ``path`` (any form ``read_weights`` reads), on the CPU."""
    state, shape = read_weights(path, encoder)
    with torch.device("meta"):  # no initialisation: every tensor comes from the file
        model = shape.build()
    load_state(model, state, path, assign=True)
    return model


def init_encoder(encoder: vit.VisionTransformer, path, shape: EncoderShape) -> None:
    """Load the weights at ``path`` (a training checkpoint's target encoder, or any other form
    ``read_weights`` reads) into ``encoder``, which has ``shape`` (``meta.init_weights``)."""
    state, found = read_weights(path)
    if found != shape:
        raise CheckpointError(f"meta.init_weights {os.fspath(path)} holds a {found.model_name}/{found.patch_size} encoder at "
                              f"{found.crop_size} px; the config trains {shape.model_name}/{shape.patch_size} at {shape.crop_size} px "
                              "(meta.model_name, mask.patch_size, data.crop_size)")
    load_state(encoder, state, path)


def load_state(model: torch.nn.Module, state: dict, source, assign: bool = False) -> None:
    """Strict ``load_state_dict`` whose failure is a one-line ``CheckpointError``."""
    try:
        model.load_state_dict(state, assign=assign)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: the weights do not fit the encoder: {first_problem(e)}") from e


# ------------------------------------------------------------------------------- export


def timm_model(shape: EncoderShape) -> tuple[str, dict]:
    """The timm ``*_gap_*`` model that builds this shape, and the arguments that differ from its
    defaults (none for the I-JEPA models timm ships)."""
    ours = shape.timm_args()

    def differing(name):
        return {k: v for k, v in ours.items() if not math.isclose(TIMM_GAP_MODELS[name][k], v)}

    name = min(TIMM_GAP_MODELS, key=lambda n: len(differing(n)))
    return name, differing(name)


def timm_create_line(path, shape: EncoderShape, num_classes: int = 0) -> str:
    name, kwargs = timm_model(shape)
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    overlay = {"file": os.fspath(path), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return f"timm.create_model({name!r}, num_classes={num_classes}, pretrained=True{args}, pretrained_cfg_overlay={overlay!r})"


def _clean_state(state: dict) -> dict:
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous() for k, v in state.items()}


@dataclass
class Head:
    """A fine-tuned classifier's linear head (any BatchNorm before it folded in), fp32, and its classes."""

    weight: torch.Tensor  # (num_classes, D)
    bias: torch.Tensor  # (num_classes,)
    classes: list[str]


def fold_head(head: dict, head_norm: dict | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head's (weight, bias) in fp32 with an eval-mode BatchNorm without affine before
    it (its running statistics ``head_norm``, or None) folded in, in fp64 arithmetic."""
    weight, bias = head["weight"].detach().double().cpu(), head["bias"].detach().double().cpu()
    if head_norm is not None:
        scale = (head_norm["running_var"].double().cpu() + eps).rsqrt()
        bias = bias - weight @ (head_norm["running_mean"].double().cpu() * scale)
        weight = weight * scale
    return weight.float(), bias.float()


def finetuned_head(checkpoint: dict, source) -> Head:
    """The head of a ``fastjepa finetune`` checkpoint (``is_finetune_checkpoint``)."""
    try:
        weight, bias = fold_head(checkpoint["head"], checkpoint.get("head_norm"), checkpoint["fastjepa_finetune"]["head_norm_eps"])
        classes = [str(c) for c in checkpoint["classes"]]
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"fine-tuning checkpoint {source}: its head is malformed ({type(e).__name__}: {e})") from e
    if weight.shape[0] != len(classes):
        raise CheckpointError(f"fine-tuning checkpoint {source}: a head of {weight.shape[0]} outputs for {len(classes)} classes")
    return Head(weight, bias, classes)


def _read_source(source, encoder: str) -> tuple[dict, EncoderShape, str, Head | None]:
    """What ``export_weights`` writes: the encoder's state and shape, where it came from, and
    the head of a fine-tuned model (None otherwise)."""
    if isinstance(source, torch.nn.Module):
        state, origin = {k.removeprefix("module."): v for k, v in source.state_dict().items()}, type(source).__name__
        return state, shape_of(state, origin), origin, None
    path = os.fspath(source)
    if os.path.isdir(path) or path.endswith(".safetensors"):
        return (*read_weights(path, encoder), path, None)
    checkpoint = read_checkpoint(path)
    head = finetuned_head(checkpoint, path) if is_finetune_checkpoint(checkpoint) else None
    return (*checkpoint_weights(checkpoint, encoder, path), path, head)


def export_weights(source, format: str, out, encoder: str = "target", force: bool = False) -> str:
    """Write the encoder at ``source`` (a path ``read_weights`` reads, or a VisionTransformer) in
    ``format`` to ``out`` (a folder for ``hf``, a ``.safetensors`` file otherwise). A
    ``fastjepa finetune`` checkpoint keeps its head: hf writes an ``IJepaForImageClassification``
    with ``id2label``, timm and safetensors add ``head.weight`` and ``head.bias``. The files
    are written beside ``out`` first and renamed into place, so a failure leaves nothing and a
    full disk raises ``DiskFullError``; an existing non-empty ``out`` is replaced only with
    ``force``. Returns a one-line summary."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}; got {encoder!r}")
    out = os.path.abspath(os.fspath(out))
    _check_out(out, format, force)
    state, shape, origin, head = _read_source(source, encoder)
    state = _clean_state(state)
    with torch.device("meta"):
        load_state(shape.build(), state, origin, assign=True)  # the exported tensors fit the model they claim to be
    metadata = {"format": format, **asdict(shape), "encoder": encoder, "source": origin}
    described = f"{shape.model_name}/{shape.patch_size} at {shape.crop_size} px" + (f" with its {len(head.classes)}-class head" if head else "")
    if format == "hf":
        _write_folder(out, lambda tmp: _write_hf(tmp, state, shape, head), space_needed(state))
        kind = "IJepaForImageClassification" if head else "IJepaModel"
        return f"wrote {out}: transformers.{kind}.from_pretrained({out!r}) loads it ({described})"
    if head is not None:
        state = {**state, "head.weight": head.weight.contiguous(), "head.bias": head.bias.contiguous()}
        metadata["classes"] = head.classes
    if format == "timm":
        name, kwargs = timm_model(shape)
        metadata.update(timm_model=name, timm_kwargs=kwargs)
    _write_file(out, state, metadata)
    if format == "timm":
        return f"wrote {out}: {timm_create_line(out, shape, len(head.classes) if head else 0)} loads it ({described})"
    return f"wrote {out}: {described}, fastjepa's key names"


def _check_out(out: str, format: str, force: bool) -> None:
    if format == "hf":
        if os.path.isfile(out):
            raise FileExistsError(f"--out {out} is a file; the hf format writes a folder")
        if os.path.isdir(out) and os.listdir(out) and not force:
            raise FileExistsError(f"--out {out} is a folder that is not empty; pass --force (force=True) to replace it")
        return
    if not out.endswith(".safetensors"):
        raise ValueError(f"--out {out}: the {format} format writes a .safetensors file (timm picks its loader by that suffix)")
    if os.path.isdir(out):
        raise FileExistsError(f"--out {out} is a folder; the {format} format writes a file")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"--out {out} exists; pass --force (force=True) to replace it")


def _write_hf(folder: str, state: dict, shape: EncoderShape, head: Head | None = None) -> None:
    from safetensors.torch import save_file

    depth = vit.VIT_SHAPES[shape.model_name][1]
    config, tensors = _hf_config(shape), _to_hf(state, depth)
    if head is not None:  # IJepaForImageClassification: the backbone under ijepa., the head as classifier
        config.architectures = ["IJepaForImageClassification"]
        config.id2label = dict(enumerate(head.classes))
        config.label2id = {name: i for i, name in enumerate(head.classes)}
        tensors = {**{f"ijepa.{k}": v for k, v in tensors.items()}, "classifier.weight": head.weight.contiguous(),
                   "classifier.bias": head.bias.contiguous()}
    config.save_pretrained(folder)
    _hf_image_processor(shape).save_pretrained(folder)
    save_file(tensors, os.path.join(folder, HF_WEIGHTS), metadata={"format": "pt"})


def _write_folder(out: str, write, needed: int) -> None:
    """``write(folder)`` into a temporary folder beside ``out``, renamed into place once whole."""
    with replaced_atomically(out, needed, folder=True) as tmp:
        write(tmp)


def _write_file(out: str, state: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    with replaced_atomically(out, space_needed(state)) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "fastjepa": json.dumps(metadata)})
