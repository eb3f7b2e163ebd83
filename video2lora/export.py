"""Export one predicted LoRA as a standard diffusers/PEFT LoRA (rank r), loadable by `load_lora_weights`."""

from __future__ import annotations

import torch
from safetensors.torch import save

from .hypernet import Video2LoRAModel, load_safetensors_bytes

PREFIX = "transformer."


@torch.no_grad()
def lora_state_dict(model: Video2LoRAModel, a_pred: torch.Tensor, b_pred: torch.Tensor, strength: float = 1.0) -> dict:
    """lora_A = A_pred @ A_aux (r x in), lora_B = strength * alpha/r * B_aux @ B_pred (out x r).

    The scale is folded into lora_B, so the file needs no alpha metadata and loads at weight 1.0."""
    layers = model.materialize(a_pred[None].float(), b_pred[None].float())
    state = {}
    for name, layer in zip(model.layer_names, layers):
        state[f"{PREFIX}{name}.lora_A.weight"] = layer.down[0].contiguous().cpu()
        state[f"{PREFIX}{name}.lora_B.weight"] = (strength * layer.up[0]).contiguous().cpu()
    return state


def export_lora_bytes(model: Video2LoRAModel, a_pred, b_pred, strength: float = 1.0, dtype=torch.float32) -> bytes:
    state = {k: v.to(dtype) for k, v in lora_state_dict(model, a_pred, b_pred, strength).items()}
    return save(state, metadata={"format": "pt", "source": "video2lora", "rank": str(model.config.lora.rank)})


def check_lora_file(data: bytes, name: str, layers: list[tuple[str, int, int]], rank: int) -> dict:
    """Load an exported LoRA and check its keys and shapes against the backbone's layers (clear errors)."""
    state = load_safetensors_bytes(data, name)
    expected = {}
    for layer, i, o in layers:
        expected[f"{PREFIX}{layer}.lora_A.weight"] = (rank, i)
        expected[f"{PREFIX}{layer}.lora_B.weight"] = (o, rank)
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        raise ValueError(f"{name}: LoRA keys do not fit this backbone: unexpected {unexpected[:3]}, missing {missing[:3]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{name}: {k} has shape {tuple(state[k].shape)}, expected {shape}")
    return state
