"""What every benchmark item shares: the targets, the Context (arguments, scratch dir, device, the saved
backbones and checkpoints), the report rows, the generator, and which clock judges an in-process comparison."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from pipelines.benchmarks import measure

TARGETS = {"pipeline_ratio": 1.15, "lora_vs_nolora": 0.05, "vs_stock_b16": 2.5, "lightlora": 0.05, "step_cost": 0.5}


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    work: str
    device: torch.device
    tiny_dir: str = ""
    tiny_ckpt: str = ""
    tiny_gen: dict = dataclasses.field(default_factory=dict)
    preset_dir: str = ""
    preset_ckpt: str = ""
    preset_gen: dict = dataclasses.field(default_factory=dict)


def row(item, name, value, unit="", target=None, met=None, **extra) -> dict:
    return {"item": str(item), "name": name, "value": value, "unit": unit, "target": target, "met": met, **extra}


def alt(ctx, value) -> dict:
    """The same comparison on the other clock, shown next to the judged value."""
    return {"alt_value": value, "alt_label": "wall" if use_cpu_clock(ctx) else "CPU"}


def generator(backbone_dir, ckpt, settings, device):
    from video2lora.config import GenerationConfig
    from video2lora.generate import Video2LoRAGenerator

    return Video2LoRAGenerator.from_pretrained(backbone_dir, ckpt, GenerationConfig(**settings), device=device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def use_cpu_clock(ctx: Context) -> bool:
    """In-process comparisons on CPU with one torch thread are judged on the process's CPU time: it is the same
    compute as wall time on an idle machine, and far less disturbed by other processes on a shared one. Wall-time
    results are always reported next to it."""
    return ctx.device.type == "cpu" and ctx.args.threads == 1


def timed_ratio(ctx, wall: dict, cpu: dict, num: str, den: str) -> tuple[float, float]:
    """(judged, other): median per-round ratio num/den on the judging clock, and on the other clock."""
    w, c = measure.median_ratio(wall[num], wall[den]), measure.median_ratio(cpu[num], cpu[den])
    return (c, w) if use_cpu_clock(ctx) else (w, c)


def not_measured(item, reason: str) -> dict:
    return {"table": [row(item, f"not measured: {reason}", None)], "details": {"not_measured": reason}}
