"""Per-sample LightLoRA: every sample of a batch gets its own low-rank update, in one forward.

A wrapped linear computes   y = W x + s_b * B_b (A_b x)   for batch row b, where
A_b = A_pred_b @ A_aux (r x in) and B_b = B_aux @ B_pred_b (out x r) are materialised once per
request (see `Video2LoRAModel.materialize`), so a denoising step costs two thin einsums per layer.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class LayerLoRA:
    """One adapted layer's materialised LoRAs for L samples: down (L, r, in), up (L, out, r)."""

    down: torch.Tensor
    up: torch.Tensor


class LightLoRALinear(nn.Module):
    """Wraps a frozen nn.Linear. With no LoRA set it is exactly the base layer."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.lora: LayerLoRA | None = None
        self.row_index: torch.Tensor | None = None  # (B,) which LoRA row each batch row uses
        self.row_scale: torch.Tensor | None = None  # (L,) strength per LoRA row, 0 = no LoRA

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # diffusers code sometimes reads .weight.dtype
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.lora is None:
            return y
        down, up = self.lora.down, self.lora.up
        num_loras = down.shape[0]
        batch = x.shape[0]
        index = self.row_index
        if index is None:
            # CFG and similar batches stack the same samples k times: [uncond..., cond...]
            if batch % num_loras:
                raise ValueError(f"batch of {batch} rows does not repeat the {num_loras} LoRA rows")
            index = torch.arange(num_loras, device=x.device).repeat(batch // num_loras)
        scale = self.row_scale[index].to(x.dtype)
        xs = x.reshape(batch, -1, x.shape[-1])
        h = torch.bmm(xs, down[index].to(x.dtype).transpose(1, 2))  # (B, T, r)
        up_rows = (up[index].to(x.dtype) * scale[:, None, None]).transpose(1, 2)  # (B, r, out), strength folded in
        # in place on the base output: no delta tensor, no extra pass over the activations;
        # rows with strength 0 add exact zeros, so they equal the base output bit for bit
        y.view(batch, -1, y.shape[-1]).baddbmm_(h, up_rows)  # view, never a copy: must write into y
        return y


def find_target_modules(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Names of nn.Linear modules matching any fnmatch pattern, in module order."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, LightLoRALinear)) and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            names.append(name)
    return names


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def inject_lightlora(model: nn.Module, patterns) -> list[str]:
    """Wrap every matching linear in place; returns the adapted names (idempotent)."""
    names = find_target_modules(model, patterns)
    if not names:
        raise ValueError(f"no nn.Linear in {type(model).__name__} matches target_modules {list(patterns)}")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            _set_submodule(model, name, LightLoRALinear(module))
    logger.debug("LightLoRA injected into %d layers", len(names))
    return names


def remove_lightlora(model: nn.Module) -> int:
    """Put the original linear modules back; the model is then exactly as before injection."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LightLoRALinear)]
    for name, module in wrapped:
        _set_submodule(model, name, module.base)
    return len(wrapped)


def lightlora_layers(model: nn.Module, names: list[str]) -> list[LightLoRALinear]:
    layers = [model.get_submodule(n) for n in names]
    for n, layer in zip(names, layers):
        if not isinstance(layer, LightLoRALinear):
            raise ValueError(f"layer {n} is not LightLoRA-wrapped; call inject_lightlora first")
    return layers


def set_loras(model, names, loras: list[LayerLoRA], strengths: torch.Tensor, row_index=None) -> None:
    if len(loras) != len(names):
        raise ValueError(f"got LoRAs for {len(loras)} layers, the model adapts {len(names)}")
    if not bool((strengths != 0).any()):  # checked once here, not per forward (no device sync)
        clear_loras(model)
        return
    for layer, lora in zip(lightlora_layers(model, names), loras):
        if lora.down.shape[-1] != layer.in_features or lora.up.shape[1] != layer.out_features:
            raise ValueError(
                f"LoRA shapes {tuple(lora.down.shape)} / {tuple(lora.up.shape)} do not fit a "
                f"{layer.in_features} -> {layer.out_features} layer"
            )
        layer.lora = lora
        layer.row_scale = strengths.to(lora.down.device, torch.float32)
        layer.row_index = row_index


def clear_loras(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, LightLoRALinear):
            m.lora = m.row_scale = m.row_index = None


@contextlib.contextmanager
def per_sample_loras(model, names, loras, strengths, row_index=None):
    """Apply one LoRA per sample for the duration of the block, then leave the model bare."""
    set_loras(model, names, loras, strengths, row_index)
    try:
        yield
    finally:
        clear_loras(model)
