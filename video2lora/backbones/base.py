"""The frozen backbone interface, built on the stock diffusers pipelines.

A backbone directory is a diffusers pipeline directory (model_index.json, transformer/, vae/, text_encoder/,
tokenizer/, scheduler/), local or any fsspec URL. Generation runs the stock pipeline's own sampler, so our
outputs match diffusers; Video2LoRA only adds the per-sample LightLoRA layers inside the transformer.
"""

from __future__ import annotations

import json
import logging
import time

import torch

from ..config import InputError, LoRAConfig
from ..lightlora import find_target_modules

logger = logging.getLogger(__name__)

COGVIDEOX_PIPELINES = {"CogVideoXPipeline": "cogvideox", "CogVideoXImageToVideoPipeline": "cogvideox-i2v"}
WAN_PIPELINES = {"WanPipeline": "wan", "WanImageToVideoPipeline": "wan-i2v"}
COMPONENTS = ("transformer", "text_encoder", "vae")  # the models of a pipeline directory (+ tokenizer, scheduler)
WAN_TARGETS = ("blocks.*.attn1.to_q", "blocks.*.attn1.to_k", "blocks.*.attn1.to_v", "blocks.*.attn1.to_out.0")


def vae_scale_factors(vae_config: dict) -> tuple[int, int]:
    """(spatial, temporal) compression of a CogVideoX or Wan VAE, from its config.json."""
    if "scale_factor_spatial" in vae_config:  # Wan
        return int(vae_config["scale_factor_spatial"]), int(vae_config["scale_factor_temporal"])
    return 2 ** (len(vae_config["block_out_channels"]) - 1), int(vae_config["temporal_compression_ratio"])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class Backbone:
    """A frozen video DiT pipeline. Subclasses say how to encode, add noise and compute the loss."""

    kind = "base"
    lora_targets: tuple[str, ...] = LoRAConfig().target_modules

    def __init__(self, pipe, kind: str | None = None):
        self.pipe = pipe
        self.kind = kind or self.kind
        for module in self.modules().values():
            module.requires_grad_(False)
            module.eval()

    # --- loading ---
    @classmethod
    def from_pretrained(cls, uri: str, device=None, dtype=None, components: tuple[str, ...] | None = None) -> "Backbone":
        """Load a pipeline directory. `components`: the models to load of ("transformer", "text_encoder", "vae")
        (None: all); a stage loads only what it uses, e.g. ("vae",) to encode references."""
        from diffusers import DiffusionPipeline

        from ..storage import local_copy

        start = time.perf_counter()
        local = local_copy(uri)
        with open(f"{local}/model_index.json") as f:
            class_name = json.load(f).get("_class_name", "")
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        unknown = set(components or ()) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown backbone components {sorted(unknown)}; choose from {COMPONENTS}")
        skipped = {c: None for c in COMPONENTS if components is not None and c not in components}
        if "text_encoder" in skipped:
            skipped["tokenizer"] = None
        try:  # safetensors only: a backbone dir with only .bin/.pt weights is refused, never unpickled
            pipe = DiffusionPipeline.from_pretrained(local, dtype=dtype, use_safetensors=True, **skipped)
        except (OSError, EnvironmentError) as e:
            raise ValueError(f"{uri}: cannot load the backbone pipeline with safetensors weights ({e})") from e
        pipe.set_progress_bar_config(disable=True)
        for name in skipped:  # an optional component (Wan's transformer) is loaded even when passed as None
            if getattr(pipe, name, None) is not None:
                setattr(pipe, name, None)
        if "vae" in skipped:  # the pipeline falls back to default factors without its VAE: take them from its config
            with open(f"{local}/vae/config.json") as f:
                vae_config = json.load(f)
            pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal = vae_scale_factors(vae_config)
        pipe.to(device)
        if class_name in COGVIDEOX_PIPELINES:
            from .cogvideox import CogVideoXBackbone

            backbone = CogVideoXBackbone(pipe, COGVIDEOX_PIPELINES[class_name])
        elif class_name in WAN_PIPELINES:
            from .wan import WanBackbone

            backbone = WanBackbone(pipe, WAN_PIPELINES[class_name])
        else:
            raise ValueError(f"{uri}: unsupported pipeline {class_name!r}; expected CogVideoX or Wan")
        logger.info("loaded %s backbone (%s) from %s in %.1fs on %s/%s", backbone.kind, ", ".join(backbone.modules()), uri,
                    time.perf_counter() - start, device, dtype)
        return backbone

    def save_pretrained(self, directory: str) -> None:
        self.pipe.save_pretrained(directory, safe_serialization=True)

    # --- properties ---
    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    def modules(self) -> dict[str, torch.nn.Module]:
        """The models this backbone holds, by component name (a stage may hold only some)."""
        return {c: m for c in COMPONENTS if (m := getattr(self.pipe, c, None)) is not None}

    @property
    def device(self) -> torch.device:
        return next(iter(self.modules().values())).device

    @property
    def dtype(self) -> torch.dtype:
        return (self.pipe.transformer if self.pipe.transformer is not None else self.vae).dtype

    @property
    def is_i2v(self) -> bool:
        return self.kind.endswith("i2v")

    def lora_layers(self, patterns=None) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of every layer the LoRA adapts, in module order."""
        names = find_target_modules(self.transformer, patterns or self.lora_targets)
        if not names:
            raise ValueError(f"no layer of the {self.kind} transformer matches {patterns or self.lora_targets}")
        return [(n, self.transformer.get_submodule(n).in_features, self.transformer.get_submodule(n).out_features) for n in names]

    @property
    def vae_scale_spatial(self) -> int:
        return self.pipe.vae_scale_factor_spatial

    @property
    def vae_scale_temporal(self) -> int:
        return self.pipe.vae_scale_factor_temporal

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        """Raise ValueError (a user error, recorded per row) for a size the model cannot make."""
        step = self.vae_scale_spatial * self.patch_size
        if num_frames < 1 or (num_frames - 1) % self.vae_scale_temporal:
            raise InputError("num_frames", f"num_frames={num_frames}: must be 1 + {self.vae_scale_temporal}k")
        if height < step or width < step or height % step or width % step:
            raise InputError("height" if height < step or height % step else "width",
                             f"height x width = {height}x{width}: each must be a positive multiple of {step}")

    @property
    def patch_size(self) -> int:
        return 2

    def enable_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each transformer block's activations in backward instead of keeping them (training only:
        without gradients it changes nothing). The frozen 5B DiT's activations at 49x480x720 are what does not
        fit an 80 GB GPU otherwise; per-sample LoRAs are kept through the recomputation."""
        from ..lightlora import checkpoint_with_loras

        if enabled:
            self.transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_loras)
        else:
            self.transformer.disable_gradient_checkpointing()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())

    def enable_vae_tiling(self, enabled: bool) -> None:
        if enabled:
            self.vae.enable_tiling()
            self.vae.enable_slicing()
        else:
            self.vae.disable_tiling()
            self.vae.disable_slicing()

    # --- interface used by generation and training ---
    def encode_video(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:  # (B,3,F,H,W) -> (B,C,f,h,w)
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_first_frames(self, images: torch.Tensor, num_frames: int) -> torch.Tensor:
        raise NotImplementedError

    def sample_latents(self, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def sampler_kwargs(self, prompts, negative_prompts, generators, num_frames, height, width, steps,
                       guidance_scale) -> dict:
        """The stock pipeline's arguments for one batch (its own sampler and CFG), latents out."""
        return dict(
            prompt=list(prompts), negative_prompt=list(negative_prompts), num_frames=num_frames, height=height,
            width=width, num_inference_steps=steps, guidance_scale=guidance_scale, generator=list(generators),
            output_type="latent", max_sequence_length=self.max_text_len, return_dict=False,
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, latents, prompt_embeds, image_latents=None, generator=None) -> torch.Tensor:
        raise NotImplementedError


def to_pil(images: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> list of PIL images (what the stock I2V pipelines take)."""
    from PIL import Image

    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
