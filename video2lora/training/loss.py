"""The training loss: the hypernetwork predicts one LoRA per reference, the frozen backbone computes its scheduler's
own training loss on the target with those LoRAs applied, with classifier-free dropout of the prompt."""

from __future__ import annotations

import torch

from .. import storage
from ..lightlora import LayerLoRA, inject_lightlora, per_sample_loras
from .data import PreparedData, collate, draw_pairs, step_seed


def prompt_dropout(prompt_embeds: torch.Tensor, empty: torch.Tensor, p: float, generator: torch.Generator):
    """Replace each row's prompt embedding by the empty prompt's with probability p (classifier-free dropout)."""
    drop = torch.rand(prompt_embeds.shape[0], generator=generator) < p
    if p <= 0 or not bool(drop.any()):
        return prompt_embeds, drop
    empty = empty.to(prompt_embeds.device, prompt_embeds.dtype).expand_as(prompt_embeds)
    return torch.where(drop.to(prompt_embeds.device)[:, None, None], empty, prompt_embeds), drop


def training_step(model, backbone, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Mean loss of a batch: one LoRA per reference applied to its own target row of the frozen backbone.

    `batch`: latents (B, C, f, h, w), prompt_embeds (B, T, D), ref_latents (B, C, f', h', w'), optional
    image_latents (B, f, C, h, w). The backbone's LightLoRA layers must be injected (`prepare_backbone`).
    """
    loras = model.materialize(*model.predict(batch["ref_latents"].to(backbone.device), generator))
    return batch_loss(model, backbone, batch, generator, loras)


def batch_loss(model, backbone, batch: dict, generator: torch.Generator, loras=None) -> torch.Tensor:
    """Mean diffusion loss (float32) of a batch with one LoRA per row (`model.materialize` output, cast to the
    backbone's dtype: refinement keeps its factors in float32 over a bf16 backbone), or bare with None."""
    device, dtype = backbone.device, backbone.dtype
    image = batch.get("image_latents")
    args = (batch["latents"].to(device), batch["prompt_embeds"].to(device), None if image is None else image.to(device))
    if loras is None:
        return backbone.training_loss(*args, generator=generator).float().mean()
    loras = [LayerLoRA(l.down.to(dtype), l.up.to(dtype)) for l in loras]
    strengths = torch.ones(len(batch["latents"]), device=device)
    with per_sample_loras(backbone.transformer, model.layer_names, loras, strengths):
        return backbone.training_loss(*args, generator=generator).float().mean()


ACTIVATION_CHECKPOINTING_ABOVE = 1_000_000_000  # DiT parameters; CogVideoX-5b: 5.6 B, the small presets: < 20 M


def prepare_backbone(backbone, model, activation_checkpointing: bool | None = None) -> None:
    """Freeze the backbone and wrap the layers the model adapts (idempotent); checks the layouts match.
    Activation checkpointing of the DiT blocks: None = on above ACTIVATION_CHECKPOINTING_ABOVE parameters."""
    expected = [tuple(l) for l in model.config.layers]
    actual = backbone.lora_layers(model.config.lora.target_modules)
    if expected != actual:
        raise ValueError(f"the model adapts {len(expected)} layers, the {backbone.kind} backbone has {len(actual)}")
    for module in backbone.modules().values():
        module.requires_grad_(False)
    inject_lightlora(backbone.transformer, model.config.lora.target_modules)
    if activation_checkpointing is None:
        if backbone.transformer.gradient_checkpointing:  # chosen earlier (e.g. by the training job): keep it
            return
        activation_checkpointing = backbone.num_parameters > ACTIVATION_CHECKPOINTING_ABOVE
    backbone.enable_activation_checkpointing(activation_checkpointing)


def lr_lambda(warmup_steps: int):
    """Constant learning rate after a linear warmup (the paper trains with a constant lr)."""
    warmup = max(0, int(warmup_steps))
    return lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0


def backbone_fingerprint(backbone) -> str:
    """A cheap checksum of every frozen weight (float64 sums), to prove training leaves the backbone unchanged."""
    acc = []
    for name, module in backbone.modules().items():
        with torch.no_grad():
            for k, v in module.state_dict().items():
                if v.is_floating_point():
                    acc.append(f"{name}.{k}:{v.double().sum().item():.12e}:{v.double().abs().sum().item():.12e}")
    return storage.content_hash("\n".join(acc).encode())


@torch.no_grad()
def eval_loss(model, backbone, data: PreparedData, seed: int = 1234, batch_size: int = 4, repeats: int = 2) -> float:
    """Loss over the prepared set with fixed pairs, timesteps and noise (no dropout): comparable across models."""
    prepare_backbone(backbone, model)
    was_training = model.training
    model.eval()
    pairs = draw_pairs(data.effects, seed, 0) * repeats
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batch = collate([data.example(t) for t, _ in chunk], [data.example(r) for _, r in chunk])
        g = torch.Generator().manual_seed(step_seed(seed, i, 0))
        total += float(training_step(model, backbone, batch, g)) * len(chunk)
        count += len(chunk)
    model.train(was_training)
    return total / count


