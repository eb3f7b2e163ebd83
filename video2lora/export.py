"""Export one predicted LoRA as a standard diffusers/PEFT LoRA (rank r), loadable by `load_lora_weights`."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class ExportedLoRA:
    """A LoRA file read back (what export_lora_bytes wrote, or any diffusers/PEFT LoRA over the same layers):
    per adapted layer, in the generator's layer order, down (r, in) and up (out, r) with every scale folded in."""

    downs: list[torch.Tensor]
    ups: list[torch.Tensor]

    @property
    def rank(self) -> int:
        return max(d.shape[0] for d in self.downs)

    @classmethod
    def from_bytes(cls, data: bytes, name: str, layers: list[tuple[str, int, int]]) -> "ExportedLoRA":
        state = check_lora_file(data, name, layers, None)
        return cls([state[f"{PREFIX}{l}.lora_A.weight"].float() for l, _, _ in layers],
                   [state[f"{PREFIX}{l}.lora_B.weight"].float() for l, _, _ in layers])

    def to_bytes(self, layer_names: list[str], strength: float = 1.0) -> bytes:
        state = {}
        for n, d, u in zip(layer_names, self.downs, self.ups):
            state[f"{PREFIX}{n}.lora_A.weight"] = d.contiguous().cpu()
            state[f"{PREFIX}{n}.lora_B.weight"] = (strength * u).contiguous().cpu()
        return save(state, metadata={"format": "pt", "source": "video2lora", "rank": str(self.rank)})


def export_lora_bytes(model: Video2LoRAModel, a_pred, b_pred, strength: float = 1.0, dtype=torch.float32) -> bytes:
    state = {k: v.to(dtype) for k, v in lora_state_dict(model, a_pred, b_pred, strength).items()}
    return save(state, metadata={"format": "pt", "source": "video2lora", "rank": str(a_pred.shape[1])})


MAX_FILE_RANK = 64  # a LoRA file a row may reuse: an exported blend of up to 64 rank-1 references


def check_lora_file(data: bytes, name: str, layers: list[tuple[str, int, int]], rank: int | None) -> dict:
    """Load an exported LoRA and check its keys and shapes against the backbone's layers (clear errors).
    rank None: any rank from 1 to MAX_FILE_RANK, the same for a layer's A and B."""
    state = load_safetensors_bytes(data, name)
    expected = {}
    for layer, i, o in layers:
        a = state.get(f"{PREFIX}{layer}.lora_A.weight")
        r = rank if rank is not None else (a.shape[0] if a is not None and a.ndim == 2 else 1)
        if rank is None and not 1 <= r <= MAX_FILE_RANK:
            raise ValueError(f"{name}: {PREFIX}{layer}.lora_A.weight has rank {r}, at most {MAX_FILE_RANK}")
        expected[f"{PREFIX}{layer}.lora_A.weight"] = (r, i)
        expected[f"{PREFIX}{layer}.lora_B.weight"] = (o, r)
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        raise ValueError(f"{name}: LoRA keys do not fit this backbone: unexpected {unexpected[:3]}, missing {missing[:3]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{name}: {k} has shape {tuple(state[k].shape)}, expected {shape}")
    return state
