"""Size report from the published model configs (dimensions only, no weights).

    python -m video2lora.size cogvideox-5b
    python -m video2lora.size cogvideox-5b --stages     # what each pipeline stage keeps resident
"""

from __future__ import annotations

import argparse
import sys

import torch

from .config import LoRAConfig, Video2LoRAConfig
from .hypernet import HyperNetwork
from .presets import PRESETS, PUBLISHED

ARTIFACT_LIMIT = 150e6  # bytes: the paper's "under 150 MB"
LORA_LIMIT = 50e3  # bytes: the paper's "under 50 KB"


def published_layers(name: str) -> list[tuple[str, int, int]]:
    p = PRESETS[name]
    prefix = "blocks" if p.family == "wan" else "transformer_blocks"
    return [(f"{prefix}.{b}.attn1.{m}", p.width, p.width) for b in range(p.blocks) for m in ("to_q", "to_k", "to_v", "to_out.0")]


def size_report(name: str, lora: LoRAConfig | None = None, bytes_per_float: int = 2) -> dict:
    if name not in PUBLISHED:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(PUBLISHED)}")
    config = Video2LoRAConfig(lora=lora or LoRAConfig(), layers=published_layers(name), latent_channels=PRESETS[name].latent_channels)
    with torch.device("meta"):  # count parameters without allocating them
        hyper = sum(p.numel() for p in HyperNetwork(config).parameters())
    lc = config.lora
    aux = sum(lc.down * i + o * lc.up for _, i, o in config.layers)
    per_video = len(config.layers) * lc.pred_size
    return {
        "model": name,
        "source": PRESETS[name].source,
        "adapted_layers": len(config.layers),
        "hypernetwork_params": hyper,
        "aux_params": aux,
        "artifact_params": hyper + aux,
        "artifact_bytes": (hyper + aux) * bytes_per_float,
        "lora_floats": per_video,
        "lora_bytes": per_video * bytes_per_float,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(PUBLISHED))
    parser.add_argument("--rank", type=int, default=LoRAConfig.rank)
    parser.add_argument("--down", type=int, default=LoRAConfig.down)
    parser.add_argument("--up", type=int, default=LoRAConfig.up)
    parser.add_argument("--stages", action="store_true", help="resident bytes of each pipeline stage instead")
    parser.add_argument("--workers", type=int, default=8, help="with --stages: ZeRO-2 training workers")
    args = parser.parse_args(argv)
    lora = LoRAConfig(rank=args.rank, down=args.down, up=args.up)
    if args.stages:
        from .stage_sizes import print_stage_report

        print_stage_report(args.model, args.workers, lora)
        return 0
    r = size_report(args.model, lora)
    art_ok = r["artifact_bytes"] < ARTIFACT_LIMIT
    lora_ok = r["lora_bytes"] < LORA_LIMIT
    print(f"model               {r['model']} ({r['source']} dimensions)")
    print(f"adapted layers      {r['adapted_layers']} (attention q/k/v/out of every block)")
    print(f"hypernetwork        {r['hypernetwork_params']:,} params")
    print(f"aux matrices        {r['aux_params']:,} params (rank {args.rank}, down {args.down}, up {args.up})")
    print(f"trained artifact    {r['artifact_params']:,} params = {r['artifact_bytes'] / 1e6:.1f} MB in bf16 "
          f"({'under' if art_ok else 'OVER'} 150 MB)")
    print(f"per-video LoRA      {r['lora_floats']:,} floats = {r['lora_bytes'] / 1e3:.1f} KB in bf16 "
          f"({'under' if lora_ok else 'OVER'} 50 KB)")
    print(f"artifact {r['artifact_bytes'] / 1e6:.1f} MB = {r['artifact_bytes'] / 2**20:.1f} MiB "
          f"(paper's < 150 MB {'holds' if art_ok else 'does not hold'}), "
          f"per-video LoRA {r['lora_bytes'] / 1e3:.1f} KB = {r['lora_bytes'] / 2**10:.1f} KiB "
          f"(paper's < 50 KB {'holds' if lora_ok else 'does not hold'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
