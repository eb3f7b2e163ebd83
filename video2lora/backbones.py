"""Frozen backbones behind one small interface, built on the stock diffusers pipelines.

A backbone directory is a diffusers pipeline directory (model_index.json, transformer/, vae/, text_encoder/,
tokenizer/, scheduler/), local or any fsspec URL. Generation runs the stock pipeline's own sampler, so our
outputs match diffusers; Video2LoRA only adds the per-sample LightLoRA layers inside the transformer.
"""

from __future__ import annotations

import json
import logging
import time

import torch
import torch.nn.functional as F

from .config import LoRAConfig
from .lightlora import find_target_modules

logger = logging.getLogger(__name__)

COGVIDEOX_PIPELINES = {"CogVideoXPipeline": "cogvideox", "CogVideoXImageToVideoPipeline": "cogvideox-i2v"}
WAN_PIPELINES = {"WanPipeline": "wan", "WanImageToVideoPipeline": "wan-i2v"}
WAN_TARGETS = ("blocks.*.attn1.to_q", "blocks.*.attn1.to_k", "blocks.*.attn1.to_v", "blocks.*.attn1.to_out.0")


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
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()

    # --- loading ---
    @classmethod
    def from_pretrained(cls, uri: str, device=None, dtype=None) -> "Backbone":
        from diffusers import DiffusionPipeline

        from .storage import local_copy

        start = time.perf_counter()
        local = local_copy(uri)
        with open(f"{local}/model_index.json") as f:
            class_name = json.load(f).get("_class_name", "")
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        try:  # safetensors only: a backbone dir with only .bin/.pt weights is refused, never unpickled
            pipe = DiffusionPipeline.from_pretrained(local, dtype=dtype, use_safetensors=True)
        except (OSError, EnvironmentError) as e:
            raise ValueError(f"{uri}: cannot load the backbone pipeline with safetensors weights ({e})") from e
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        if class_name in COGVIDEOX_PIPELINES:
            backbone = CogVideoXBackbone(pipe, COGVIDEOX_PIPELINES[class_name])
        elif class_name in WAN_PIPELINES:
            from .wan import WanBackbone

            backbone = WanBackbone(pipe, WAN_PIPELINES[class_name])
        else:
            raise ValueError(f"{uri}: unsupported pipeline {class_name!r}; expected CogVideoX or Wan")
        logger.info("loaded %s backbone from %s in %.1fs on %s/%s", backbone.kind, uri, time.perf_counter() - start, device, dtype)
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

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

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
            raise ValueError(f"num_frames={num_frames}: must be 1 + {self.vae_scale_temporal}k")
        if height < step or width < step or height % step or width % step:
            raise ValueError(f"height x width = {height}x{width}: each must be a positive multiple of {step}")

    @property
    def patch_size(self) -> int:
        return 2

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

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, latents, prompt_embeds, image_latents=None, generator=None) -> torch.Tensor:
        raise NotImplementedError


def to_pil(images: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> list of PIL images (what the stock I2V pipelines take)."""
    from PIL import Image

    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class CogVideoXBackbone(Backbone):
    """CogVideoX text-to-video and image-to-video (the paper's backbone); v-prediction, DDIM."""

    kind = "cogvideox"

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def max_text_len(self) -> int:
        return self.transformer.config.max_text_seq_length

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        """Pixels (B, 3, F, H, W) in [-1, 1] -> scaled latents (B, C, f, h, w), as the pipeline encodes."""
        pixels = pixels.to(self.device, self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        # the mean without a generator: a reference must always give the same LoRA
        latents = dist.mode() if generator is None else dist.sample(generator)
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=self.max_text_len, device=self.device
        )
        return embeds

    @torch.no_grad()
    def encode_first_frames(self, images: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
        """First frames (B, 3, H, W) -> image latents (B, f, C, h, w): frame 0 encoded, the rest zeros."""
        lat = self.vae.encode(images.to(self.device, self.vae.dtype)[:, :, None]).latent_dist.mode()
        lat = lat.permute(0, 2, 1, 3, 4) * self.vae.config.scaling_factor
        pad = lat.new_zeros(lat.shape[0], num_latent_frames - 1, *lat.shape[2:])
        return torch.cat([lat, pad], dim=1)

    def sample_latents(self, prompts, negative_prompts, generators, num_frames, height, width, steps, guidance_scale, images=None):
        """Run the stock pipeline's sampler (DDIM + CFG); returns latents (B, f, C, h, w)."""
        kwargs = dict(
            prompt=list(prompts),
            negative_prompt=list(negative_prompts),
            num_frames=num_frames,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=list(generators),
            output_type="latent",
            max_sequence_length=self.max_text_len,
            return_dict=False,
        )
        if self.is_i2v:
            if images is None:
                raise ValueError("the image-to-video backbone needs a first frame per row (image_uri)")
            kwargs["image"] = to_pil(images)
        with torch.no_grad():
            return self.pipe(**kwargs)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, f, C, h, w) -> pixels (B, 3, F, H, W) in [-1, 1]."""
        return self.pipe.decode_latents(latents).float().clamp(-1, 1)

    def training_loss(self, latents, prompt_embeds, image_latents=None, generator=None) -> torch.Tensor:
        """v-prediction loss with uniform timesteps. latents (B, C, f, h, w) scaled; returns per-sample loss."""
        sched = self.pipe.scheduler
        x0 = latents.permute(0, 2, 1, 3, 4).to(self.dtype)  # (B, f, C, h, w)
        b = x0.shape[0]
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator, device="cpu").to(self.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(self.device, x0.dtype)
        noisy = sched.add_noise(x0, noise, t)
        target = sched.get_velocity(x0, noise, t)
        model_input = noisy
        if self.is_i2v:
            model_input = torch.cat([noisy, image_latents.to(noisy.dtype)], dim=2)
        h, w = x0.shape[-2] * self.vae_scale_spatial, x0.shape[-1] * self.vae_scale_spatial
        rope = None
        if self.transformer.config.use_rotary_positional_embeddings:
            rope = self.pipe._prepare_rotary_positional_embeddings(h, w, x0.shape[1], self.device)
        pred = self.transformer(
            hidden_states=model_input, encoder_hidden_states=prompt_embeds.to(self.dtype), timestep=t,
            image_rotary_emb=rope, return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
