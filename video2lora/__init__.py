"""Video2LoRA: a hypernetwork reads a reference video and predicts a per-video LightLoRA for a frozen video DiT."""

from .config import GenerationConfig, HyperConfig, LoRAConfig, TrainConfig, Video2LoRAConfig
from .hypernet import Video2LoRAModel

__version__ = "0.1.0"

__all__ = [
    "GenerationConfig",
    "HyperConfig",
    "LoRAConfig",
    "TrainConfig",
    "Video2LoRAConfig",
    "Video2LoRAModel",
    "Video2LoRAGenerator",
    "GenerationRequest",
    "Backbone",
]


def __getattr__(name):  # keep `import video2lora` light: diffusers loads only when used
    if name in ("Video2LoRAGenerator", "GenerationRequest", "PredictedLoRA"):
        from . import generate

        return getattr(generate, name)
    if name == "Backbone":
        from .backbones import Backbone

        return Backbone
    raise AttributeError(name)
