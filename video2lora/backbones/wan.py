"""Wan2.1 text-to-video behind the `Backbone` interface, built on the stock diffusers `WanPipeline`.

Wan is a flow-matching model: x_t = (1 - sigma) x0 + sigma * noise, and the transformer predicts the
velocity noise - x0 at timestep sigma * 1000. Latents are (B, C, f, h, w), normalised with the VAE's
per-channel `latents_mean` / `latents_std`, exactly as `WanPipeline` does before decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import InputError
from .base import WAN_TARGETS, Backbone

# WanPipeline.__call__'s default text length (umt5-xxl); tiny models save a shorter tokenizer.model_max_length
WAN_MAX_TEXT_LEN = 512


class WanBackbone(Backbone):
    """Wan2.1 text-to-video (WanPipeline): flow matching, UniPC (or flow Euler) sampler of the pipeline, CFG."""

    kind = "wan"
    lora_targets = WAN_TARGETS

    def __init__(self, pipe, kind: str | None = None, vae_fp32: bool = True):
        kind = kind or self.kind
        if kind.endswith("i2v"):
            # WanImageToVideoPipeline needs a CLIP image encoder, and the stock pipeline repeats the image
            # conditioning once per generator, so a batch of rows with different first frames does not work.
            raise NotImplementedError(
                "Wan image-to-video (WanImageToVideoPipeline) is not supported yet; use a Wan text-to-video "
                "backbone (WanPipeline) or CogVideoX image-to-video"
            )
        super().__init__(pipe, kind)
        if pipe.vae is None:  # a stage without the VAE (training on prepared latents): nothing to normalise here
            return
        if vae_fp32 and pipe.vae.dtype != torch.float32:
            # as the Wan model cards do: the VAE in fp32 (small), the transformer in bf16; the pipeline casts.
            # .float(), not .to(torch.float32): diffusers' ModelMixin.to warns on any dtype cast
            pipe.vae.float()
        vc = pipe.vae.config
        self._latents_mean = torch.tensor(vc.latents_mean, dtype=torch.float32).view(1, vc.z_dim, 1, 1, 1)
        self._latents_std = torch.tensor(vc.latents_std, dtype=torch.float32).view(1, vc.z_dim, 1, 1, 1)

    # --- properties ---
    @property
    def patch_size(self) -> int:
        p = self.transformer.config.patch_size  # (t, h, w) = (1, 2, 2)
        if p[1] != p[2]:
            raise ValueError(f"non-square spatial patch {tuple(p)} is not supported")
        return p[1]

    @property
    def latent_channels(self) -> int:
        if self.pipe.transformer is not None:  # a stage may hold no VAE: the DiT denoises latents of this width
            return self.transformer.config.out_channels
        return self.vae.config.z_dim

    @property
    def max_text_len(self) -> int:
        return int(min(WAN_MAX_TEXT_LEN, self.pipe.tokenizer.model_max_length))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        super().check_size(num_frames, height, width)
        if height % 16 or width % 16:  # WanPipeline.check_inputs, whatever the tiny VAE's scale
            raise InputError("height" if height % 16 else "width",
                             f"height x width = {height}x{width}: each must be a positive multiple of 16")

    def _normalise(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latents_mean.to(latents), self._latents_std.to(latents)
        return (latents - mean) / std

    def _denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latents_mean.to(latents), self._latents_std.to(latents)
        return latents * std + mean

    # --- interface used by generation and training ---
    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        """Pixels (B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, f, h, w), as WanPipeline normalises."""
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        # the mean without a generator: a reference must always give the same LoRA
        latents = dist.mode() if generator is None else dist.sample(generator)
        return self._normalise(latents)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, max_sequence_length=self.max_text_len, device=self.device
        )
        return embeds

    def encode_first_frames(self, images: torch.Tensor, num_frames: int) -> torch.Tensor:
        raise NotImplementedError("Wan image-to-video is not supported yet")

    def sample_latents(self, prompts, negative_prompts, generators, num_frames, height, width, steps, guidance_scale, images=None):
        """Run the stock WanPipeline sampler (flow matching + CFG); returns normalised latents (B, C, f, h, w)."""
        if images is not None:
            raise NotImplementedError("this Wan backbone is text-to-video; it takes no first frames")
        with torch.no_grad():
            return self.pipe(**self.sampler_kwargs(prompts, negative_prompts, generators, num_frames, height, width,
                                                   steps, guidance_scale))[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, f, h, w) -> pixels (B, 3, F, H, W) in [-1, 1] (un-normalise, vae.decode)."""
        latents = self._denormalise(latents.to(self.vae.device, self.vae.dtype))
        return self.vae.decode(latents, return_dict=False)[0].float().clamp(-1, 1)

    def training_loss(self, latents, prompt_embeds, image_latents=None, generator=None) -> torch.Tensor:
        """Flow-matching loss, sigma ~ U(0, 1): x_t = (1 - sigma) x0 + sigma noise, target noise - x0,
        timestep sigma * num_train_timesteps. latents (B, C, f, h, w) normalised; returns the per-sample loss (B,)."""
        if image_latents is not None:
            raise NotImplementedError("this Wan backbone is text-to-video; it takes no image latents")
        x0 = latents.to(self.device, torch.float32)
        b = x0.shape[0]
        sigma = torch.rand((b,), generator=generator, device="cpu").to(self.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(self.device)
        s = sigma.view(b, 1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        target = noise - x0
        pred = self.transformer(
            hidden_states=noisy.to(self.dtype),
            timestep=sigma * self.num_train_timesteps,
            encoder_hidden_states=prompt_embeds.to(self.device, self.dtype),
            return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), target, reduction="none").flatten(1).mean(1)
