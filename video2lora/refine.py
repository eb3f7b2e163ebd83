"""Refining a predicted LoRA on its own reference clip, before generation (HyperDreamBooth's fast fine-tuning).

Zero-shot, the hypernetwork's LoRA for an effect it never saw is much weaker than the best LoRA its own output
space holds for that effect (docs/EFFECTS.md, "refining on the reference"). A few Adam steps of the backbone's own
diffusion loss on the reference clip, starting from the prediction and moving only A_pred and B_pred (about 150
floats per layer; the backbone and the aux matrices stay frozen), close part of that gap. It costs `steps` forward
and backward passes of the DiT over `draws` noised copies of the reference, once per reference (not per video).

Each reference is refined on its own, with noise and timesteps drawn from `seed` alone: its refined LoRA does not
depend on which other references share the call.
"""

from __future__ import annotations

import math

import torch

from .predict import PredictedLoRA
from .training.loss import ACTIVATION_CHECKPOINTING_ABOVE, batch_loss, prompt_dropout

# reference_fit above this: the LoRA fits its own reference worse than no LoRA (an unfamiliar reference). Chosen on
# validation seed 101 among 0.8-1.3 (docs/measurements/unfamiliar_2026-12-07/)
UNFAMILIAR_ABOVE = 1.0


def reference_batch(backbone, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                    image_latents: torch.Tensor | None, draws: int) -> dict:
    """One reference (each tensor batch 1) repeated `draws` times on the backbone's device and dtype, as
    `training.loss.batch_loss` takes a batch."""
    rows = torch.zeros(draws, dtype=torch.long)
    repeat = lambda t: None if t is None else t.to(backbone.device, backbone.dtype)[rows]  # noqa: E731
    return {"latents": repeat(latents), "prompt_embeds": repeat(prompt_embeds), "image_latents": repeat(image_latents)}


def refine_lora(model, backbone, lora: PredictedLoRA, latents: torch.Tensor,
                prompt_embeds: torch.Tensor, empty_prompt: torch.Tensor, image_latents: torch.Tensor | None = None,
                steps: int = 40, lr: float = 3e-3, draws: int = 2, seed: int = 0,
                prompt_dropout_p: float = 0.1) -> tuple[PredictedLoRA, list[float]]:
    """One reference: `lora` refined for `steps` Adam steps on the reference's latents (1, C, f, h, w) with its
    caption's embedding (1, T, D) (dropped for `empty_prompt` at the training rate, as in training). The model's
    LightLoRA layers must be injected in `backbone.transformer`. Returns the refined LoRA and the loss of
    every step."""
    if steps < 0 or draws < 1 or lr <= 0:
        raise ValueError(f"refine: steps={steps}, draws={draws}, lr={lr}: need steps >= 0, draws >= 1, lr > 0")
    if steps == 0:
        return lora, []
    device = backbone.device
    a = torch.nn.Parameter(lora.a_pred.detach().to(device, torch.float32).clone()[None])
    b = torch.nn.Parameter(lora.b_pred.detach().to(device, torch.float32).clone()[None])
    opt = torch.optim.Adam([a, b], lr=lr)
    rows = torch.zeros(draws, dtype=torch.long)
    batch = reference_batch(backbone, latents, prompt_embeds, image_latents, draws)
    losses = []
    # the DiT's activations for the backward pass: checkpointed above the size the training job checkpoints at
    checkpointing = backbone.transformer.gradient_checkpointing
    backbone.enable_activation_checkpointing(checkpointing or backbone.num_parameters > ACTIVATION_CHECKPOINTING_ABOVE)
    try:
        with torch.enable_grad():
            for step in range(steps):
                g = torch.Generator().manual_seed(seed * 100_003 + step)  # this reference's draws, nobody else's
                embeds, _ = prompt_dropout(batch["prompt_embeds"], empty_prompt, prompt_dropout_p, g)
                loss = batch_loss(model, backbone, {**batch, "prompt_embeds": embeds}, g,
                                  model.materialize(a[rows], b[rows]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        backbone.enable_activation_checkpointing(checkpointing)
    return PredictedLoRA(a.detach()[0].cpu(), b.detach()[0].cpu()), losses


@torch.no_grad()
def reference_fit(model, backbone, lora: PredictedLoRA, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                  image_latents: torch.Tensor | None = None, draws: int = 8, seed: int = 0) -> float:
    """How well `lora` explains its own reference: the reference's diffusion loss (latents (1, C, f, h, w), caption
    embedding (1, T, D), no prompt dropout) with the LoRA, over the bare backbone's on the same `draws` timesteps and
    noises. Below 1 the LoRA fits its reference better than no LoRA; the shipped hypernetwork's LoRAs for a kind of
    effect it never saw score above 1 (docs/EFFECTS.md, "how far the prediction starts"). Costs 2 x `draws` DiT
    forward passes."""
    device = backbone.device
    rows = torch.zeros(draws, dtype=torch.long)
    batch = reference_batch(backbone, latents, prompt_embeds, image_latents, draws)
    a, b = lora.a_pred.to(device, torch.float32)[None], lora.b_pred.to(device, torch.float32)[None]
    fitted = batch_loss(model, backbone, batch, torch.Generator().manual_seed(seed), model.materialize(a[rows], b[rows]))
    bare = batch_loss(model, backbone, batch, torch.Generator().manual_seed(seed))
    fit = float(fitted / bare)
    if not math.isfinite(fit) or fit < 0:
        raise ValueError(f"reference fit {fit}: diffusion loss {float(fitted)} with the LoRA, {float(bare)} without; "
                         "the reference's latents or the LoRA hold non-finite values")
    return fit
