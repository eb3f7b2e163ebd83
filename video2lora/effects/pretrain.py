"""Pretrain the frozen parts of a small backbone on the procedural effects world, framework-free.

Random weights encode nothing, so before a backbone can stand in for a large pretrained model every part that
Video2LoRA later keeps frozen is trained here, on captioned clips of the whole distribution (every effect and the
static "none" class; captions describe the content only, never the effect):

1. the VAE (`AutoencoderKLCogVideoX`) as an autoencoder (L1 + MSE + a small KL), until its reconstructions are
   faithful (`vae_psnr`); its `scaling_factor` is then set so that scaled latents have unit variance;
2. the DiT (`CogVideoXTransformer3DModel`) with the diffusion loss of `Backbone.training_loss` (the scheduler's own
   v-prediction loss), jointly with the tiny text encoder, with caption dropout so that classifier-free guidance
   works, keeping an EMA of the weights (what is saved).

The result is an ordinary diffusers pipeline directory (`save_backbone`) that `Backbone.from_pretrained` loads.
Nothing here knows about Ray. Used by `jobs/pretrain_backbone.py`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- data
@dataclass
class ClipSet:
    """Rendered clips as uint8 (N, 3, F, H, W) (compact: 28 KB a clip), their captions and effect labels."""

    pixels: torch.Tensor
    prompts: list[str]
    effects: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, index, device=None) -> torch.Tensor:
        """Pixels of rows `index` as float in [-1, 1]."""
        x = self.pixels[index].to(device if device is not None else "cpu").float()
        return x / 127.5 - 1.0


def render_clips(seed: int, clips_per_label: int, labels=None, num_frames: int = 9, size: int = 32,
                 progress: bool = False) -> ClipSet:
    """`clips_per_label` fresh scenes for every effect and the static class (video2lora.effects.world), in memory."""
    from . import world as fx

    labels = list(labels or fx.ALL_LABELS)
    pixels, prompts, names = [], [], []
    start = time.perf_counter()
    for k, label in enumerate(labels):
        for rec in fx.make_dataset(seed, clips_per_label, effects=[label], num_frames=num_frames, size=size):
            pixels.append(torch.from_numpy(((rec["video"] + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)))
            prompts.append(rec["prompt"])
            names.append(label)
        if progress:
            logger.info("rendered %d/%d labels (%d clips, %.0fs)", k + 1, len(labels), len(prompts), time.perf_counter() - start)
    return ClipSet(torch.stack(pixels), prompts, names)


def _cosine_lr(step: int, total: int, warmup: int, start: float | None = None, budget_s: float | None = None) -> float:
    """Warm-up then cosine decay to 10 %; with a time budget, progress is the larger of steps and time used."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    if budget_s and start is not None:
        p = max(p, (time.perf_counter() - start) / budget_s)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _eta(start: float, done: int, total: int) -> str:
    el = time.perf_counter() - start
    return f"{el / 60:.1f}m elapsed, eta {el / max(done, 1) * (total - done) / 60:.1f}m"


# --------------------------------------------------------------------------------------------- VAE
def vae_loss(vae, x: torch.Tensor, kl_weight: float, generator=None) -> tuple[torch.Tensor, dict]:
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator)
    rec = vae.decode(z).sample
    l1 = (rec - x).abs().mean()
    mse = (rec - x).pow(2).mean()
    kl = (0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar)).mean()
    return l1 + mse + kl_weight * kl, {"l1": float(l1), "mse": float(mse), "kl": float(kl)}


def train_vae(vae, clips: ClipSet, steps: int, batch_size: int = 16, lr: float = 1e-3, kl_weight: float = 1e-4,
              seed: int = 0, device="cpu", log_every: int = 50, time_budget_s: float | None = None) -> list[dict]:
    """Train the VAE as an autoencoder on `clips`; returns one metrics dict per logged step."""
    vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)
    warmup = min(100, max(1, steps // 20))
    history, start = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _cosine_lr(step, steps, warmup, start, time_budget_s)
        idx = torch.randint(0, len(clips), (batch_size,), generator=g)
        x = clips.batch(idx, device)
        if bool(torch.rand(1, generator=g) < 0.5):  # mirror augmentation (content only; effects are symmetric-ish)
            x = x.flip(-1)
        loss, parts = vae_loss(vae, x, kl_weight, gd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            psnr = 10 * math.log10(4.0 / max(parts["mse"], 1e-10))
            row = {"step": step + 1, "loss": float(loss), "train_psnr": psnr, **parts, "time_s": time.perf_counter() - start}
            history.append(row)
            logger.info("vae step %d/%d loss %.4f psnr %.2f dB kl %.3f (%s)", step + 1, steps, row["loss"], psnr,
                        parts["kl"], _eta(start, step + 1, steps))
        if time_budget_s and time.perf_counter() - start > time_budget_s:
            logger.info("vae: time budget of %.0fs reached at step %d", time_budget_s, step + 1)
            break
    vae.eval().requires_grad_(False)
    return history


@torch.no_grad()
def vae_psnr(vae, clips: ClipSet, batch_size: int = 32, device="cpu", per_effect: bool = False):
    """Reconstruction PSNR (dB, pixels in [-1, 1] so the peak-to-peak range is 2) through the posterior mode."""
    vae.to(device).eval()
    mse_sum, n, by_effect = 0.0, 0, {}
    for i in range(0, len(clips), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(clips)))
        x = clips.batch(idx, device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = (rec - x).pow(2).flatten(1).mean(1).cpu()
        mse_sum += float(mse.sum())
        n += len(idx)
        for j, e in zip(idx.tolist(), mse.tolist()):
            by_effect.setdefault(clips.effects[j], []).append(e)
    psnr = 10 * math.log10(4.0 / max(mse_sum / n, 1e-12))
    if per_effect:
        return psnr, {k: 10 * math.log10(4.0 / max(float(np.mean(v)), 1e-12)) for k, v in sorted(by_effect.items())}
    return psnr


@torch.no_grad()
def set_scaling_factor(pipe, clips: ClipSet, batch_size: int = 32, device="cpu", max_clips: int = 512) -> float:
    """Set the VAE's scaling_factor to 1 / std of the latent means (as Stable Diffusion / CogVideoX did)."""
    vae = pipe.vae
    vals = []
    for i in range(0, min(len(clips), max_clips), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(clips), max_clips))
        vals.append(vae.encode(clips.batch(idx, device)).latent_dist.mode().float().cpu())
    std = float(torch.cat(vals).std())
    factor = 1.0 / max(std, 1e-6)
    vae.register_to_config(scaling_factor=factor)
    pipe.vae_scaling_factor_image = factor
    return factor


# --------------------------------------------------------------------------------------------- DiT
@torch.no_grad()
def encode_latents(backbone, clips: ClipSet, batch_size: int = 32) -> torch.Tensor:
    """Scaled latent means (N, C, f, h, w) of every clip, as `Backbone.encode_video` gives them."""
    out = []
    for i in range(0, len(clips), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(clips)))
        out.append(backbone.encode_video(clips.batch(idx)).float().cpu())
    return torch.cat(out)


def text_embeddings(pipe, prompts: list[str], max_len: int, device) -> torch.Tensor:
    """Prompt embeddings with gradients into the text encoder (`Backbone.encode_prompts` is no-grad)."""
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, add_special_tokens=True,
                         return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(device))[0]


class EMA:
    def __init__(self, module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1.0 - d)


def train_dit(backbone, latents: torch.Tensor, prompts: list[str], steps: int, batch_size: int = 32,
              lr: float = 5e-4, text_lr: float = 2e-4, prompt_dropout: float = 0.1, ema_decay: float = 0.999,
              seed: int = 0, log_every: int = 50, time_budget_s: float | None = None,
              train_text_encoder: bool = True) -> list[dict]:
    """Train the backbone's DiT (and text encoder) with `Backbone.training_loss` on pre-encoded latents.

    At the end the DiT (and text encoder) hold their EMA weights and are frozen again."""
    pipe, device = backbone.pipe, backbone.device
    dit, text = pipe.transformer, pipe.text_encoder
    dit.train().requires_grad_(True)
    text.train(train_text_encoder).requires_grad_(train_text_encoder)
    groups = [{"params": list(dit.parameters()), "lr": lr, "base": lr, "weight_decay": 0.01}]
    if train_text_encoder:
        groups.append({"params": list(text.parameters()), "lr": text_lr, "base": text_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99))
    ema = EMA(dit, ema_decay)
    ema_text = EMA(text, ema_decay) if train_text_encoder else None
    g = torch.Generator().manual_seed(seed)
    max_len = backbone.max_text_len
    warmup = min(200, max(1, steps // 20))
    history, start = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = group["base"] * _cosine_lr(step, steps, warmup, start, time_budget_s)
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        drop = (torch.rand(batch_size, generator=g) < prompt_dropout).tolist()
        batch_prompts = ["" if d else prompts[i] for i, d in zip(idx.tolist(), drop)]
        x0 = latents[idx].to(device)
        if train_text_encoder:
            embeds = text_embeddings(pipe, batch_prompts, max_len, device)
        else:
            with torch.no_grad():
                embeds = text_embeddings(pipe, batch_prompts, max_len, device)
        loss = backbone.training_loss(x0, embeds, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], 1.0)
        opt.step()
        warm_decay = min(ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early weights are forgotten fast
        ema.update(dit, warm_decay)
        if ema_text is not None:
            ema_text.update(text, warm_decay)
        if step % log_every == 0 or step == steps - 1:
            row = {"step": step + 1, "loss": float(loss), "grad_norm": float(gn), "time_s": time.perf_counter() - start}
            history.append(row)
            logger.info("dit step %d/%d loss %.4f grad_norm %.3f (%s)", step + 1, steps, row["loss"], row["grad_norm"],
                        _eta(start, step + 1, steps))
        if time_budget_s and time.perf_counter() - start > time_budget_s:
            logger.info("dit: time budget of %.0fs reached at step %d", time_budget_s, step + 1)
            break
    with torch.no_grad():  # keep the EMA weights
        for p, s in zip(dit.parameters(), ema.shadow.parameters()):
            p.copy_(s)
        if ema_text is not None:
            for p, s in zip(text.parameters(), ema_text.shadow.parameters()):
                p.copy_(s)
    dit.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    return history


@torch.no_grad()
def dit_eval_loss(backbone, latents: torch.Tensor, prompts: list[str], batch_size: int = 64, seed: int = 1234) -> float:
    """Diffusion loss on held-out latents with fixed noise and timesteps (comparable across runs)."""
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for i in range(0, len(latents), batch_size):
        x0 = latents[i : i + batch_size].to(backbone.device)
        emb = text_embeddings(backbone.pipe, prompts[i : i + batch_size], backbone.max_text_len, backbone.device)
        total += float(backbone.training_loss(x0, emb, generator=g).sum())
        n += len(x0)
    return total / max(n, 1)


def save_backbone(pipe, directory: str, generation_defaults: dict, dtype: torch.dtype = torch.float16) -> str:
    """Save the pretrained pipeline as a diffusers directory (weights in `dtype`, small) + generation_defaults."""
    from ..presets import write_generation_defaults

    pipe = copy.deepcopy(pipe).to("cpu")
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder):
        m.to(dtype)
    pipe.save_pretrained(directory, safe_serialization=True)
    _drop_source_paths(directory)
    write_generation_defaults(directory, generation_defaults)
    return directory


def _drop_source_paths(directory: str) -> None:
    """A pipeline loaded from a path saves that path (`_name_or_path`) into its configs: drop it (a shipped
    backbone must not name the machine it was made on)."""
    import glob
    import json
    import os

    for path in glob.glob(os.path.join(directory, "*", "config.json")) + [os.path.join(directory, "model_index.json")]:
        with open(path) as f:
            config = json.load(f)
        if config.pop("_name_or_path", None) is not None:
            with open(path, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")


def new_pipeline(preset: str, seed: int = 0):
    from ..presets import build_pipeline

    return build_pipeline(preset, seed)


def pretrain(preset: str = "effects-cogvideox", *, seed: int = 0, clips_per_label: int = 200, vae_steps: int = 2000,
             vae_batch: int = 16, vae_lr: float = 1e-3, dit_steps: int = 3000, dit_batch: int = 32, dit_lr: float = 5e-4,
             device="cpu", eval_clips_per_label: int = 8, log_every: int = 50, vae_time_budget_s=None,
             dit_time_budget_s=None, pipe=None, labels=None) -> tuple[object, dict]:
    """The whole pretraining: render clips, train the VAE, set its scaling, encode latents, train the DiT.

    `labels`: the effects to render (default: the single effects and the static class). `pipe`: continue from
    this pipeline instead of the preset's random weights; with `vae_steps=0` its VAE and scaling factor are
    kept (a backbone extended to new effects keeps the latent space its DiT was trained in).
    Returns (pipeline on `device`, report dict with PSNR, losses and timings)."""
    from . import world as fx
    from ..backbones import CogVideoXBackbone

    if vae_steps <= 0 and pipe is None:
        raise ValueError("vae_steps=0 keeps the VAE of a given pipeline (--init); a fresh preset needs VAE training")
    t0 = time.perf_counter()
    started_from = "pretrained pipeline" if pipe is not None else f"preset {preset}"
    pipe = pipe if pipe is not None else new_pipeline(preset, seed)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    labels = list(labels or fx.ALL_LABELS)
    logger.info("rendering %d clips per label (%d labels)", clips_per_label, len(labels))
    train = render_clips(seed, clips_per_label, labels, progress=True)
    held = render_clips(seed + 10_000, eval_clips_per_label, labels)
    report = {"preset": preset, "started_from": started_from, "seed": seed, "train_clips": len(train), "eval_clips": len(held),
              "render_s": time.perf_counter() - t0}

    t = time.perf_counter()
    report["vae_psnr_before"] = vae_psnr(pipe.vae, held, device=device)
    report["vae_history"] = []
    if vae_steps > 0:
        report["vae_history"] = train_vae(pipe.vae, train, vae_steps, vae_batch, vae_lr, seed=seed, device=device,
                                          log_every=log_every, time_budget_s=vae_time_budget_s)
    psnr, per_effect = vae_psnr(pipe.vae, held, device=device, per_effect=True)
    report.update(vae_psnr=psnr, vae_psnr_per_effect=per_effect, vae_s=time.perf_counter() - t)
    report["scaling_factor"] = (set_scaling_factor(pipe, train, device=device) if vae_steps > 0
                                else float(pipe.vae.config.scaling_factor))  # a kept VAE keeps its scaling
    logger.info("VAE: held-out reconstruction PSNR %.2f dB (before training %.2f dB); scaling_factor %.4f",
                psnr, report["vae_psnr_before"], report["scaling_factor"])

    t = time.perf_counter()
    backbone = CogVideoXBackbone(pipe)
    latents = encode_latents(backbone, train)
    held_latents = encode_latents(backbone, held)
    report["dit_eval_loss_before"] = dit_eval_loss(backbone, held_latents, held.prompts)
    report["dit_history"] = train_dit(backbone, latents, train.prompts, dit_steps, dit_batch, dit_lr, seed=seed,
                                      log_every=log_every, time_budget_s=dit_time_budget_s)
    report["dit_eval_loss"] = dit_eval_loss(backbone, held_latents, held.prompts)
    report["dit_s"] = time.perf_counter() - t
    report["total_s"] = time.perf_counter() - t0
    logger.info("DiT: held-out diffusion loss %.4f (before training %.4f)", report["dit_eval_loss"],
                report["dit_eval_loss_before"])
    return pipe, report
