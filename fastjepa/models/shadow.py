"""A bf16 shadow of the target encoder, refreshed by the EMA in the same pass.

Under bf16 autocast every Linear and Conv2d casts its fp32 weight and bias to bf16 on each
forward (read 4 bytes, write 2, per parameter, per step). ``Bf16Shadow`` keeps those bf16
values in a copy of the target encoder instead: ``ema_update_`` writes them while it
updates the fp32 target, and every other parameter (LayerNorm, position table) is shared
with the target. Its forward under autocast computes exactly what the target's would
(the same round-to-nearest bf16 values reach the same kernels), without the casts.
The fp32 target stays the EMA's state and the checkpoint's content.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastjepa.ops import ema_update_

SHADOWED_MODULES = (nn.Linear, nn.Conv2d)  # what autocast runs in bf16 from fp32 parameters


class Bf16Shadow:
    """``module``: the target's twin for bf16-autocast forwards; ``update_(m)``: the EMA of
    ``online`` into the target and the shadow, in two launches (shadowed and shared tensors)."""

    def __init__(self, target: nn.Module, online: nn.Module):
        self.module = copy.deepcopy(target).requires_grad_(False)
        shadowed = {
            f"{module_name}.{param_name}" if module_name else param_name
            for module_name, module in target.named_modules() if isinstance(module, SHADOWED_MODULES)
            for param_name, _ in module.named_parameters(recurse=False)
        }
        target_params, online_params = dict(target.named_parameters()), dict(online.named_parameters())
        if target_params.keys() != online_params.keys():
            raise ValueError("Bf16Shadow: the target and online encoders have different parameters")
        self.shadowed, self.shared = ([], [], []), ([], [])
        for name, param in target_params.items():
            owner_name, _, attr = name.rpartition(".")
            owner = self.module.get_submodule(owner_name)
            if name in shadowed:
                shadow = nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False)
                setattr(owner, attr, shadow)
                for group, tensor in zip(self.shadowed, (param, online_params[name], shadow)):
                    group.append(tensor)
            else:
                setattr(owner, attr, param)  # the same fp32 tensor: follows the EMA by itself
                self.shared[0].append(param)
                self.shared[1].append(online_params[name])

    @torch.no_grad()
    def update_(self, momentum: float | torch.Tensor) -> None:
        targets, onlines, shadows = self.shadowed
        ema_update_(targets, onlines, momentum, shadows)
        ema_update_(*self.shared, momentum)
