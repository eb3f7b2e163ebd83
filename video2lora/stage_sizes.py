"""What each stage keeps resident at a published size, from the published configs on the meta device (nothing
downloaded, nothing allocated): `python -m video2lora.size cogvideox-5b --stages`.

Resident parameter bytes only (weights, and in training the optimizer's share); activations come on top and are
measured on a GPU (docs/measurements/)."""

from __future__ import annotations

import torch

from .config import LoRAConfig, Video2LoRAConfig
from .hypernet import HyperNetwork
from .presets import get_preset

GPU_BYTES = 80e9  # an 80 GB GPU (H100 / A100 80GB)
# what each stage holds, as (component, stored as): see video2lora.predict.LoRAPredictor (hypernetwork stage),
# video2lora.generate.Video2LoRAGenerator (generation) and pipelines/train/worker.py (training)
STAGES = {
    "hypernetwork": (("vae.encoder", "bf16"), ("hypernetwork", "bf16")),
    "generation": (("text_encoder", "bf16"), ("transformer", "bf16"), ("vae", "bf16"), ("aux", "bf16")),
    "training": (("transformer", "bf16"), ("hypernetwork", "zero2"), ("aux", "zero2")),
}
# ZeRO-2 per trainable parameter: a bf16 copy on every rank, and the fp32 master, fp32 gradient and two fp32
# AdamW moments partitioned over the ranks
BF16, ZERO2_REPLICATED, ZERO2_PARTITIONED = 2, 2, 16


def component_params(name: str, lora: LoRAConfig | None = None) -> dict[str, int]:
    """Parameters of every component of a published preset that carries its component configs."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from .size import published_layers

    preset = get_preset(name)
    if not (preset.transformer and preset.text_encoder):
        raise SystemExit(f"{name}: no component configs in video2lora.presets (have: cogvideox-5b)")
    config = Video2LoRAConfig(lora=lora or LoRAConfig(), layers=published_layers(name),
                              latent_channels=preset.latent_channels)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX(**preset.vae)
        out = {
            "transformer": count(CogVideoXTransformer3DModel(**preset.transformer)),
            "text_encoder": count(T5EncoderModel(T5Config(**preset.text_encoder))),
            "vae": count(vae), "vae.encoder": count(vae.encoder),  # CogVideoX: no quant_conv
            "hypernetwork": count(HyperNetwork(config)),
        }
    lc = config.lora
    out["aux"] = sum(lc.down * i + o * lc.up for _, i, o in config.layers)
    return out


def stage_report(name: str, workers: int = 8, lora: LoRAConfig | None = None) -> list[dict]:
    params = component_params(name, lora)
    rows = []
    for stage, parts in STAGES.items():
        total = 0.0
        for component, kind in parts:
            per = BF16 if kind == "bf16" else ZERO2_REPLICATED + ZERO2_PARTITIONED / workers
            total += params[component] * per
        rows.append({"stage": stage, "holds": [c for c, _ in parts], "params": sum(params[c] for c, _ in parts),
                     "resident_bytes": total, "fits_80gb": total < GPU_BYTES})
    return rows


def print_stage_report(name: str, workers: int, lora: LoRAConfig | None = None) -> None:
    print(f"| stage | holds | parameters | resident, bf16 (training: ZeRO-2 over {workers} workers) | fits 80 GB |")
    print("|---|---|---|---|---|")
    for r in stage_report(name, workers, lora):
        print(f"| {r['stage']} | {', '.join(r['holds'])} | {r['params'] / 1e9:.2f} B | "
              f"{r['resident_bytes'] / 1e9:.1f} GB | {'yes' if r['fits_80gb'] else 'no'} |")
