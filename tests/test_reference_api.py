"""Every public name of the reference's ``src/`` tree exists under ``fastjepa.`` with the same
parameters, in the same order, with the same defaults.

The table below lists the reference's public functions and classes (facebookresearch/ijepa,
commit 52c1ae9), their parameters as written there, and their public methods. A class's
parameters are its constructor's, without ``self``. fastjepa may add parameters only where
EXTENSIONS names them, after the reference's and with defaults, so every reference call still
binds the same way.
"""

import ast
import importlib
import inspect

import pytest
import torch.nn as nn

REFERENCE_API = {
    "fastjepa.datasets.imagenet1k": {
        "make_imagenet1k": "transform, batch_size, collator=None, pin_mem=True, num_workers=8, world_size=1, rank=0, root_path=None, "
                           "image_folder=None, training=True, copy_data=False, drop_last=True, subset_file=None",
        "ImageNet": "root, image_folder='imagenet_full_size/061417/', tar_file='imagenet_full_size-061417.tar.gz', transform=None, train=True, "
                    "job_id=None, local_rank=None, copy_data=True, index_targets=False",
        "ImageNetSubset": ("dataset, subset_file", ["filter_dataset_", "classes"]),
        "copy_imgnt_locally": "root, suffix, image_folder='imagenet_full_size/061417/', tar_file='imagenet_full_size-061417.tar.gz', job_id=None, "
                              "local_rank=None",
    },
    "fastjepa.transforms": {
        "make_transforms": "crop_size=224, crop_scale=(0.3, 1.0), color_jitter=1.0, horizontal_flip=False, color_distortion=False, "
                           "gaussian_blur=False, normalization=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))",
        "GaussianBlur": "p=0.5, radius_min=0.1, radius_max=2.0",
    },
    "fastjepa.utils.distributed": {
        "init_distributed": "port=40112, rank_and_world_size=(None, None)",
        "AllGather": ("*args, **kwargs", ["forward", "backward"]),
        "AllReduceSum": ("*args, **kwargs", ["forward", "backward"]),
        "AllReduce": ("*args, **kwargs", ["forward", "backward"]),
    },
    "fastjepa.utils.logging": {
        "gpu_timer": "closure, log_timings=True",
        "CSVLogger": ("fname, *argv", ["log"]),
        "AverageMeter": ("", ["reset", "update"]),
        "grad_logger": "named_params",
    },
    "fastjepa.masks.default": {"DefaultCollator": ""},
    "fastjepa.masks.random": {"MaskCollator": ("ratio=(0.4, 0.6), input_size=(224, 224), patch_size=16", ["step"])},
    "fastjepa.masks.multiblock": {
        "MaskCollator": ("input_size=(224, 224), patch_size=16, enc_mask_scale=(0.2, 0.8), pred_mask_scale=(0.2, 0.8), aspect_ratio=(0.3, 3.0), "
                         "nenc=1, npred=2, min_keep=4, allow_overlap=False", ["step"]),
    },
    "fastjepa.masks.utils": {"apply_masks": "x, masks"},
    "fastjepa.utils.tensors": {
        "trunc_normal_": "tensor, mean=0.0, std=1.0, a=-2.0, b=2.0",
        "apply_masks": "x, masks",
        "repeat_interleave_batch": "x, B, repeat",
    },
    "fastjepa.utils.schedulers": {
        "WarmupCosineSchedule": ("optimizer, warmup_steps, start_lr, ref_lr, T_max, last_epoch=-1, final_lr=0.0", ["step"]),
        "CosineWDSchedule": ("optimizer, ref_wd, T_max, final_wd=0.0", ["step"]),
    },
    "fastjepa.helper": {
        "load_checkpoint": "device, r_path, encoder, predictor, target_encoder, opt, scaler",
        "init_model": "device, patch_size=16, model_name='vit_base', crop_size=224, pred_depth=6, pred_emb_dim=384",
        "init_opt": "encoder, predictor, iterations_per_epoch, start_lr, ref_lr, warmup, num_epochs, wd=1e-06, final_wd=1e-06, final_lr=0.0, "
                    "use_bfloat16=False, ipe_scale=1.25",
    },
    "fastjepa.train": {"main": "args, resume_preempt=False"},
    "fastjepa.models.vision_transformer": {
        "get_2d_sincos_pos_embed": "embed_dim, grid_size, cls_token=False",
        "get_2d_sincos_pos_embed_from_grid": "embed_dim, grid",
        "get_1d_sincos_pos_embed": "embed_dim, grid_size, cls_token=False",
        "get_1d_sincos_pos_embed_from_grid": "embed_dim, pos",
        "drop_path": "x, drop_prob=0.0, training=False",
        "DropPath": ("drop_prob=None", ["forward"]),
        "MLP": ("in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0", ["forward"]),
        "Attention": ("dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0", ["forward"]),
        "Block": ("dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU, "
                  "norm_layer=nn.LayerNorm", ["forward"]),
        "PatchEmbed": ("img_size=224, patch_size=16, in_chans=3, embed_dim=768", ["forward"]),
        "ConvEmbed": ("channels, strides, img_size=224, in_chans=3, batch_norm=True", ["forward"]),
        "VisionTransformerPredictor": ("num_patches, embed_dim=768, predictor_embed_dim=384, depth=6, num_heads=12, mlp_ratio=4.0, qkv_bias=True, "
                                       "qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=nn.LayerNorm, "
                                       "init_std=0.02, **kwargs", ["fix_init_weight", "forward"]),
        "VisionTransformer": ("img_size=[224], patch_size=16, in_chans=3, embed_dim=768, predictor_embed_dim=384, depth=12, predictor_depth=12, "
                              "num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, "
                              "norm_layer=nn.LayerNorm, init_std=0.02, **kwargs", ["fix_init_weight", "forward", "interpolate_pos_encoding"]),
        "vit_predictor": "**kwargs",
        "vit_tiny": "patch_size=16, **kwargs",
        "vit_small": "patch_size=16, **kwargs",
        "vit_base": "patch_size=16, **kwargs",
        "vit_large": "patch_size=16, **kwargs",
        "vit_huge": "patch_size=16, **kwargs",
        "vit_giant": "patch_size=16, **kwargs",
    },
}
# The reference's module-level tables.
REFERENCE_CONSTANTS = {
    ("fastjepa.models.vision_transformer", "VIT_EMBED_DIMS"): {
        "vit_tiny": 192, "vit_small": 384, "vit_base": 768, "vit_large": 1024, "vit_huge": 1280, "vit_giant": 1408,
    },
}
# Parameters fastjepa adds after the reference's, each with a default.
EXTENSIONS = {
    ("fastjepa.masks.multiblock", "MaskCollator"): ["fix_position_range"],  # mask.fix_position_range
    # the CLI's run options, keyword-only
    ("fastjepa.train", "main"): ["device", "out", "max_steps", "seed", "resume", "checkpoint_every", "progress", "profile_steps",
                                 "torch_profiler", "profile_ranks"],
}


def parse(params: str) -> list[tuple[str, inspect._ParameterKind, object]]:
    """The (name, kind, default) of each parameter of a written parameter list."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    names = [a.arg for a in args.args]
    defaults = [None] * (len(names) - len(args.defaults)) + [ast.unparse(d) for d in args.defaults]
    parsed = [(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty if d is None else eval(d, {"nn": nn}))
              for n, d in zip(names, defaults)]
    if args.vararg:
        parsed.append((args.vararg.arg, inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.empty))
    if args.kwarg:
        parsed.append((args.kwarg.arg, inspect.Parameter.VAR_KEYWORD, inspect.Parameter.empty))
    return parsed


def same_default(ours, theirs) -> bool:
    """Equal values, a list default equal to a tuple one (the reference's ``img_size=[224]``)."""
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)):
        return len(ours) == len(theirs) and all(same_default(a, b) for a, b in zip(ours, theirs))
    return ours is theirs or (type(ours) is type(theirs) and ours == theirs)


ENTRIES = [(module, name, spec) for module, names in REFERENCE_API.items() for name, spec in names.items()]


@pytest.mark.parametrize("module, name, spec", ENTRIES, ids=[f"{m.removeprefix('fastjepa.')}.{n}" for m, n, _ in ENTRIES])
def test_reference_name_has_the_reference_signature(module, name, spec):
    params, methods = spec if isinstance(spec, tuple) else (spec, [])
    obj = getattr(importlib.import_module(module), name, None)
    assert obj is not None, f"{module} has no {name}"
    for method in methods:
        assert hasattr(obj, method), f"{module}.{name} has no {method}"
    if inspect.isclass(obj) and issubclass(obj, __import__("torch").autograd.Function):
        assert callable(obj.apply)
        return
    ours = list(inspect.signature(obj).parameters.values())
    expected = parse(params)
    added = EXTENSIONS.get((module, name), [])
    head, tail = ours[: len(expected)], ours[len(expected):]
    if expected and expected[-1][1] == inspect.Parameter.VAR_KEYWORD:  # **kwargs stays last
        head, tail = ours[: len(expected) - 1] + ours[-1:], ours[len(expected) - 1 : -1]
    assert [(p.name, p.kind) for p in head] == [(n, k) for n, k, _ in expected], f"{module}.{name}{inspect.signature(obj)}"
    for p, (n, _, default) in zip(head, expected):
        assert same_default(p.default, default), f"{module}.{name}: {n} defaults to {p.default!r}, the reference to {default!r}"
    assert [p.name for p in tail] == added, f"{module}.{name} adds {[p.name for p in tail]}; EXTENSIONS lists {added}"
    assert all(p.default is not inspect.Parameter.empty for p in tail)


@pytest.mark.parametrize("module, name", list(REFERENCE_CONSTANTS))
def test_reference_constants(module, name):
    assert getattr(importlib.import_module(module), name) == REFERENCE_CONSTANTS[(module, name)]


def test_the_table_check_fails_on_a_wrong_default():
    wrong = parse("crop_size=224, crop_scale=(0.3, 0.9)")
    assert not same_default(wrong[1][2], (0.3, 1.0)) and not same_default(1, 1.0) and same_default([224], (224,))
