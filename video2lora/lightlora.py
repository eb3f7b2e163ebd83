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


class _PerSampleLoRALinear(nn.Module):
    """A frozen nn.Linear plus per-batch-row low-rank factors from `_row_factors` (the subclass's), added in place."""

    base: nn.Linear

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
        if not self._has_lora():
            return y
        batch = x.shape[0]
        down_t, up_t = self._row_factors(batch, x.dtype, x.device)
        xs = x.reshape(batch, -1, x.shape[-1])
        # in place on the base output: no delta tensor, no extra pass over the activations;
        # rows with strength 0 add exact zeros, so they equal the base output bit for bit
        y.view(batch, -1, y.shape[-1]).baddbmm_(torch.bmm(xs, down_t), up_t)  # view, never a copy: must write into y
        return y


class LightLoRALinear(_PerSampleLoRALinear):
    """Wraps a frozen nn.Linear. With no LoRA set it is exactly the base layer."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.lora: LayerLoRA | None = None
        self.row_index: torch.Tensor | None = None  # (B,) which LoRA row each batch row uses
        self.row_scale: torch.Tensor | None = None  # (L,) strength per LoRA row, 0 = no LoRA
        self._rows: tuple | None = None  # inference cache: per-row factors of the current LoRAs (see _row_factors)

    def _has_lora(self) -> bool:
        return self.lora is not None

    def _row_factors(self, batch: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """down^T (B, in, r) and strength-scaled up^T (B, r, out) of each batch row.

        They depend only on the LoRAs and the batch layout, not on the activations, so without gradients (every
        denoising step of a request) they are built once and reused: a step then costs one bmm and one baddbmm_
        per layer, not the 8 small gather/scale/copy ops it took to rebuild them on every forward. With gradients
        (training) they are rebuilt on every forward, so the autograd graph is always the current one."""
        lora, scale_rows, index = self.lora, self.row_scale, self.row_index
        # inside torch.compile the factors are computed in the graph from the LoRA tensors, which are graph inputs:
        # no identity check on them (a guard on object identity would recompile for every new batch of LoRAs)
        compiling = torch.compiler.is_compiling()
        key = (batch, dtype, device, torch.is_inference_mode_enabled())
        cached = self._rows
        if (not compiling and cached is not None and not torch.is_grad_enabled() and cached[0] is lora
                and cached[1] is scale_rows and cached[2] is index and cached[3] == key):
            return cached[4], cached[5]
        num_loras = lora.down.shape[0]
        if index is None:
            # CFG and similar batches stack the same samples k times: [uncond..., cond...]
            if batch % num_loras:
                raise ValueError(f"batch of {batch} rows does not repeat the {num_loras} LoRA rows")
            index = torch.arange(num_loras, device=lora.down.device).repeat(batch // num_loras)
        scale = scale_rows[index].to(device, dtype)
        down_t = lora.down[index].to(device, dtype).transpose(1, 2)  # (B, in, r)
        up_t = (lora.up[index].to(device, dtype) * scale[:, None, None]).transpose(1, 2)  # (B, r, out), strength folded in
        if not torch.is_grad_enabled() and not compiling:
            self._rows = (lora, scale_rows, self.row_index, key, down_t.contiguous(), up_t.contiguous())
            return self._rows[4], self._rows[5]
        return down_t, up_t


class FusedLightLoRALinear(_PerSampleLoRALinear):
    """diffusers' fused q/k/v projection (`fuse_qkv_projections`: one `to_qkv` linear) with the per-sample LoRAs
    of the three LightLoRA layers it replaces: one base GEMM, one LoRA down-projection with the three down factors
    concatenated (B, in, 3r), and one up-projection with a block-diagonal (B, 3r, 3 out) up factor. It equals
    to_q, to_k, to_v applied one by one (`tests/test_step_cost.py`). The three LightLoRA layers stay where they
    are and keep receiving the LoRAs by name (`set_loras`); this layer reads them at each forward."""

    def __init__(self, base: nn.Linear, parts: tuple[LightLoRALinear, ...]):
        super().__init__()
        self.base = base
        self.parts = tuple(parts)  # a plain tuple: not registered again as submodules (no duplicate weights)
        self._fused: tuple | None = None

    def _has_lora(self) -> bool:
        if all(p.lora is None for p in self.parts):
            return False
        if any(p.lora is None for p in self.parts):
            raise ValueError("fused q/k/v projection: some of q, k, v have a LoRA and some not; set all or none")
        return True

    def _row_factors(self, batch: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        factors = [p._row_factors(batch, dtype, device) for p in self.parts]
        compiling = torch.compiler.is_compiling()
        cached = self._fused
        if (not compiling and not torch.is_grad_enabled() and cached is not None
                and all(a is b for a, b in zip(cached[0], factors))):
            return cached[1], cached[2]
        down_t = torch.cat([d for d, _ in factors], dim=2)  # (B, in, 3r)
        ups = [u for _, u in factors]
        up_t = ups[0].new_zeros(batch, sum(u.shape[1] for u in ups), sum(u.shape[2] for u in ups))
        r0 = c0 = 0
        for u in ups:  # block diagonal: q's rank only reaches q's outputs, and so on
            up_t[:, r0: r0 + u.shape[1], c0: c0 + u.shape[2]] = u
            r0, c0 = r0 + u.shape[1], c0 + u.shape[2]
        if not torch.is_grad_enabled() and not compiling:
            self._fused = (factors, down_t, up_t)
        return down_t, up_t


def fuse_qkv_lightlora(transformer: nn.Module) -> int:
    """Fuse every self-attention's q/k/v projections (diffusers' own `fuse_qkv_projections`), keeping the LoRAs:
    each new `to_qkv` becomes a FusedLightLoRALinear over the three LightLoRA layers. The separate q, k, v base
    weights become views into the fused weight, so fusing costs no memory. Returns the number of fused layers."""
    wrapped = 0
    attentions = [m for m in transformer.modules() if all(isinstance(getattr(m, n, None), nn.Module) for n in ("to_q", "to_k", "to_v"))]
    for attn in attentions:
        kinds = [isinstance(getattr(attn, n), LightLoRALinear) for n in ("to_q", "to_k", "to_v")]
        if any(kinds) and not all(kinds):
            raise ValueError("fused q/k/v projections need to_q, to_k and to_v all adapted by the LoRA or none of "
                             "them (the checkpoint's target_modules adapt only some)")
    transformer.fuse_qkv_projections()
    for attn in attentions:
        fused = getattr(attn, "to_qkv", None)
        if fused is None or isinstance(fused, FusedLightLoRALinear):
            continue
        parts = tuple(getattr(attn, n) for n in ("to_q", "to_k", "to_v"))
        start = 0
        with torch.no_grad():  # share storage: q/k/v base weights are now slices of the fused one
            for part in parts:
                lin = part.base if isinstance(part, LightLoRALinear) else part
                rows = lin.out_features
                lin.weight = nn.Parameter(fused.weight[start: start + rows], requires_grad=False)
                if lin.bias is not None and fused.bias is not None:
                    lin.bias = nn.Parameter(fused.bias[start: start + rows], requires_grad=False)
                start += rows
        if isinstance(parts[0], LightLoRALinear):
            attn.to_qkv = FusedLightLoRALinear(fused, parts)
            wrapped += 1
    return wrapped


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
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, (LightLoRALinear, FusedLightLoRALinear))]
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
        layer._rows = None


def clear_loras(model: nn.Module, names: list[str] | None = None) -> None:
    """Leave the model bare: every LightLoRA layer, or only the named ones (no walk over all modules)."""
    layers = lightlora_layers(model, names) if names is not None else model.modules()
    for m in layers:
        if isinstance(m, LightLoRALinear):
            m.lora = m.row_scale = m.row_index = m._rows = None


def checkpoint_with_loras(block: nn.Module, *args):
    """Activation checkpointing of one transformer block that keeps its per-sample LoRAs: the block's forward is
    recomputed during backward, after `per_sample_loras` has left the model bare, so the LoRAs the block saw in
    the forward are put back for the recomputation (and the gradients reach them through the first forward).
    Pass to diffusers' `enable_gradient_checkpointing(gradient_checkpointing_func=...)`."""
    from torch.utils.checkpoint import checkpoint

    layers = [m for m in block.modules() if isinstance(m, LightLoRALinear)]
    seen = [(m.lora, m.row_scale, m.row_index) for m in layers]

    def run(*inputs):
        now = [(m.lora, m.row_scale, m.row_index) for m in layers]
        for m, (lora, scale, index) in zip(layers, seen):
            m.lora, m.row_scale, m.row_index, m._rows = lora, scale, index, None
        try:
            return block(*inputs)
        finally:
            for m, (lora, scale, index) in zip(layers, now):
                m.lora, m.row_scale, m.row_index, m._rows = lora, scale, index, None

    return checkpoint(run, *args, use_reentrant=False)


@contextlib.contextmanager
def per_sample_loras(model, names, loras, strengths, row_index=None):
    """Apply one LoRA per sample for the duration of the block, then leave the model bare."""
    set_loras(model, names, loras, strengths, row_index)
    try:
        yield
    finally:
        clear_loras(model, names)
