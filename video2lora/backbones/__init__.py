"""Frozen video DiT backbones: one interface (`base.Backbone`), one file per model family."""

from .base import Backbone, default_device, default_dtype, to_pil
from .cogvideox import CogVideoXBackbone
from .wan import WanBackbone

__all__ = ["Backbone", "CogVideoXBackbone", "WanBackbone", "default_device", "default_dtype", "to_pil"]
