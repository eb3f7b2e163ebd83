"""Reference clips in, per-video LoRAs out: the VAE encoder and the hypernetwork, and nothing else (what the
Ray hypernetwork stage keeps resident; the DiT and the text encoder are the generation stage's)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

TILE_ABOVE = 256  # px on a side: larger references are encoded in VAE tiles and slices (bounded memory)


@dataclass
class PredictedLoRA:
    """One reference's LoRA: A_pred (L, r, down) and B_pred (L, up, r). About 150 floats per layer."""

    a_pred: torch.Tensor
    b_pred: torch.Tensor

    @staticmethod
    def stack(loras: list["PredictedLoRA"]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([l.a_pred for l in loras]), torch.stack([l.b_pred for l in loras])

    @property
    def rank(self) -> int:
        return self.a_pred.shape[1]

    @staticmethod
    def blend(loras: list["PredictedLoRA"], weights: list[float]) -> "PredictedLoRA":
        """The weighted mix of several references' LoRAs, exactly: their factors side by side (ranks add), each
        B_pred scaled by its weight, so that at every adapted layer (B_aux B) (A A_aux) = sum_k w_k B_k A_k. One
        LoRA at weight 1 is returned as it is."""
        from .config import InputError

        if len(loras) != len(weights) or not loras:
            raise InputError("reference_weights", f"{len(loras)} LoRAs and {len(weights)} weights: give one weight per LoRA")
        for w in weights:
            try:
                finite = bool(np.isfinite(float(w)))
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise InputError("reference_weights", f"reference_weights has {w!r}: each must be a finite number")
        if len(loras) == 1 and weights[0] == 1.0:
            return loras[0]
        return PredictedLoRA(torch.cat([l.a_pred for l in loras], dim=1),
                             torch.cat([float(w) * l.b_pred for l, w in zip(loras, weights)], dim=2))

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(A_pred, B_pred) as raw float32 bytes, the form a LoRA travels in between Ray stages."""
        return self.a_pred.float().cpu().numpy().tobytes(), self.b_pred.float().cpu().numpy().tobytes()

    @classmethod
    def from_bytes(cls, a: bytes, b: bytes, a_shape: tuple, b_shape: tuple) -> "PredictedLoRA":
        """The inverse of to_bytes; the tensors own their memory (writable, independent of the buffers). A rank of
        -1 in the shapes (a_shape[1], b_shape[2]) is read from the length (a blend's rank is a sum of ranks)."""
        a_arr, b_arr = np.frombuffer(a, np.float32), np.frombuffer(b, np.float32)
        return cls(torch.from_numpy(a_arr.reshape(a_shape).copy()), torch.from_numpy(b_arr.reshape(b_shape).copy()))


@torch.no_grad()
def encode_references(backbone, pixels: torch.Tensor) -> torch.Tensor:
    """Reference clips (N, 3, F, H, W) in [-1, 1] -> their VAE latents, in tiles above TILE_ABOVE px; the VAE's
    tiling is left as it was (the generator chose its own for decoding)."""
    was_tiled = bool(getattr(backbone.vae, "use_tiling", False))
    backbone.enable_vae_tiling(max(pixels.shape[-2:]) > TILE_ABOVE)
    try:
        return backbone.encode_video(pixels)
    finally:
        backbone.enable_vae_tiling(was_tiled)


def same_shape_batches(tensors: list[torch.Tensor], batch_size: int):
    """`batch_size` tensors at a time, each batch one shape (they are stacked)."""
    for i in range(0, len(tensors), batch_size):
        chunk = tensors[i : i + batch_size]
        shapes = {tuple(t.shape) for t in chunk}
        if len(shapes) != 1:
            raise ValueError(f"references in one batch must share a shape, got {sorted(shapes)}")
        yield chunk


@torch.no_grad()
def predict_from_latents(hypernet, latents: list[torch.Tensor], batch_size: int = 8) -> list[PredictedLoRA]:
    """Reference latents (C, f, h, w) -> one PredictedLoRA each (fp32, on CPU), `batch_size` at a time."""
    out = []
    param = next(hypernet.parameters())
    for chunk in same_shape_batches(latents, batch_size):
        a, b = hypernet(torch.stack(chunk).to(param.device, param.dtype))
        out += [PredictedLoRA(a[j].float().cpu(), b[j].float().cpu()) for j in range(len(chunk))]
    return out


@torch.no_grad()
def encode_reference_list(backbone, references: list[torch.Tensor], batch_size: int = 8) -> list[torch.Tensor]:
    """Reference clips (3, F, H, W) in [-1, 1] -> their latents (C, f, h, w), `batch_size` clips a VAE call."""
    out = []
    for chunk in same_shape_batches(references, batch_size):
        out += list(encode_references(backbone, torch.stack(chunk)))
    return out


def predict_loras(backbone, hypernet, references: list[torch.Tensor], batch_size: int = 8) -> list[PredictedLoRA]:
    """Reference clips (3, F, H, W) in [-1, 1] -> one PredictedLoRA each (fp32, on CPU), `batch_size` at a time."""
    return predict_from_latents(hypernet, encode_reference_list(backbone, references, batch_size), batch_size)


class LoRAPredictor:
    """Holds the backbone's VAE (encoder path only) and the trained hypernetwork."""

    def __init__(self, backbone, hypernet: torch.nn.Module, config):
        self.backbone = backbone
        self.hypernet = hypernet.eval().requires_grad_(False)
        self.config = config  # the checkpoint's Video2LoRAConfig (layers, LoRA sizes)

    @classmethod
    def from_pretrained(cls, backbone_uri: str, checkpoint_uri: str, device=None, dtype=None) -> "LoRAPredictor":
        from .backbones import Backbone
        from .hypernet import Video2LoRAModel

        backbone = Backbone.from_pretrained(backbone_uri, device=device, dtype=dtype, components=("vae",))
        backbone.vae.decoder = None  # references are only encoded: the decoder is the generation stage's
        model = Video2LoRAModel.from_pretrained(checkpoint_uri)
        if model.config.latent_channels != backbone.latent_channels:
            raise ValueError(f"checkpoint {checkpoint_uri} reads {model.config.latent_channels}-channel latents, the "
                             f"backbone's VAE makes {backbone.latent_channels}: wrong --backbone for this --checkpoint?")
        hypernet = model.hypernet.to(backbone.device)  # the aux matrices stay behind: generation applies them
        return cls(backbone, hypernet, model.config)

    def modules(self) -> dict[str, torch.nn.Module]:
        """What this object keeps resident."""
        return {"vae.encoder": self.backbone.vae.encoder, "hypernetwork": self.hypernet}

    def predict_loras(self, references: list[torch.Tensor], batch_size: int = 8) -> list[PredictedLoRA]:
        return predict_loras(self.backbone, self.hypernet, references, batch_size)

    def encode(self, references: list[torch.Tensor], batch_size: int = 8) -> list[torch.Tensor]:
        """Reference clips -> their VAE latents, which `predict_from_latents` reads (and refinement, downstream)."""
        return encode_reference_list(self.backbone, references, batch_size)

    def predict_from_latents(self, latents: list[torch.Tensor], batch_size: int = 8) -> list[PredictedLoRA]:
        return predict_from_latents(self.hypernet, latents, batch_size)
