"""CogVideoX text-to-video and image-to-video behind the `Backbone` interface (the paper's backbone)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backbone, to_pil


class CogVideoXBackbone(Backbone):
    """CogVideoX text-to-video and image-to-video (the paper's backbone); v-prediction, DDIM."""

    kind = "cogvideox"

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def latent_channels(self) -> int:
        if self.pipe.transformer is not None:  # a stage may hold no VAE: the DiT denoises latents of this width
            return self.transformer.config.out_channels
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
        kwargs = self.sampler_kwargs(prompts, negative_prompts, generators, num_frames, height, width, steps,
                                     guidance_scale)
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
