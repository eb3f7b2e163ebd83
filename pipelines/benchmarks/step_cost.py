"""Item 8: cheaper denoising steps with per-sample LoRAs (video2lora/backbones/step_cost.py). On the preset
backbone, side by side in one process: each diffusers step cache, compiled blocks, fused q/k/v projections and
the shipped default combination (GenerationConfig's), against the stock diffusers pipeline with one LoRA loaded
(same steps, sizes, seeds, the same LoRA). Per video: DiT evaluations computed (rows through the blocks' attention, over the number of blocks), DiT
compute (this process's CPU seconds inside the transformer's forward with one torch thread; wall seconds on a
GPU), wall time of the whole generation, and PSNR of the video against the uncached one."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import torch

from pipelines.benchmarks import fixtures, measure
from pipelines.benchmarks.context import TARGETS, Context, row, sync, use_cpu_clock
from video2lora.backbones.step_cost import resolved
from video2lora.config import GenerationConfig
from video2lora.effects.evaluation import psnr

logger = logging.getLogger("benchmark")

# name -> GenerationConfig overrides; each cache at its measured setting, what an unset field means for it
# (video2lora.backbones.step_cost.CACHE_DEFAULTS); "default" is GenerationConfig() as shipped (magcache 0.3, at
# least every 4th step)
OFF = dict(step_cache="none", compile_blocks=False, fuse_qkv=False)
OPTIONS = {
    "none": OFF,
    "pyramid_attention": {**OFF, "step_cache": "pyramid_attention"},
    "faster": {**OFF, "step_cache": "faster"},
    "taylorseer": {**OFF, "step_cache": "taylorseer"},
    "first_block": {**OFF, "step_cache": "first_block"},
    "compile": {**OFF, "compile_blocks": True},
    "fused": {**OFF, "fuse_qkv": True},
    "first_block+fused": {**OFF, "step_cache": "first_block", "fuse_qkv": True},
    # magcache around the shipped default (0.3, at least every 4th step): harsher
    "magcache_0.5": {**OFF, "step_cache": "magcache", "step_cache_threshold": 0.5, "step_cache_interval": 4,
                     "step_cache_timesteps": (100, 800)},
    "magcache_1.0_every6": {**OFF, "step_cache": "magcache", "step_cache_threshold": 1.0, "step_cache_interval": 6,
                            "step_cache_timesteps": (100, 800)},
    "default": {k: v for k, v in dataclasses.asdict(GenerationConfig()).items()
                if k.startswith(("step_cache", "compile", "fuse"))},  # as shipped
}


class DiTMeter:
    """Counts the DiT evaluations a transformer computes and the time spent inside its forward (CPU or wall)."""

    def __init__(self, transformer, cpu_clock: bool, device):
        self.seconds, self._start, self.cpu_clock, self.device = 0.0, 0.0, cpu_clock, device
        self.transformer = transformer
        self._hooks = [transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
                       transformer.register_forward_hook(self._post)]
        # what a cache skips shows in the attention projections that run: rows through every block's self-attention
        # query projection (to_qkv once fused), over the number of blocks = full DiT evaluations actually computed
        self.attention_rows = 0
        self.blocks = sum(name.endswith("attn1.to_q") for name, _ in transformer.named_modules())
        self._counted: set[int] = set()

    def _count(self, module, args):
        self.attention_rows += int(args[0].shape[0])

    def _pre(self, module, args, kwargs):
        for name, m in self.transformer.named_modules():  # again each call: fused projections appear on first use
            if name.endswith(("attn1.to_q", "attn1.to_qkv")) and id(m) not in self._counted:
                m.register_forward_pre_hook(self._count)
                self._counted.add(id(m))
        self._start = self._now()

    def _now(self) -> float:
        if self.cpu_clock:
            return time.process_time()
        sync(self.device)
        return time.perf_counter()

    def _post(self, module, args, out):
        self.seconds += self._now() - self._start

    def take(self) -> tuple[float, float]:
        """(full DiT evaluations computed, seconds inside the DiT) since the last take."""
        out = (self.attention_rows / max(1, self.blocks), self.seconds)
        self.seconds, self.attention_rows = 0.0, 0
        return out


def bench_step_cost(ctx: Context) -> dict:
    from diffusers import DiffusionPipeline

    from video2lora.export import export_lora_bytes
    from video2lora.generate import GenerationRequest, Video2LoRAGenerator

    a, s = ctx.args, dict(ctx.preset_gen)
    backbone_dir, checkpoint_dir, label = ctx.preset_dir, ctx.preset_ckpt, a.preset
    if getattr(a, "cost_on", "preset") == "trained":  # the bundled effects backbone: trained features, 25 steps
        from pipelines.defaults import BUNDLED_CHECKPOINT

        checkpoint_dir, label = str(BUNDLED_CHECKPOINT), "trained effects backbone"
        backbone_dir = os.path.join(checkpoint_dir, "backbone")
        with open(os.path.join(backbone_dir, "generation_defaults.json")) as f:
            s = json.load(f)
        if a.steps:
            s["steps"] = a.steps
    videos = a.cost_videos
    cpu_clock = use_cpu_clock(ctx)
    options = dict(OPTIONS)
    if a.quick:  # the CI smoke run: every kind of option once, compile left to tests/test_step_cost.py
        options.pop("compile")
    gens, meters = {}, {}
    for name, overrides in options.items():
        cfg = dataclasses.replace(GenerationConfig(**s), **overrides)
        gens[name] = Video2LoRAGenerator.from_pretrained(backbone_dir, checkpoint_dir, cfg, device=ctx.device)
        meters[name] = DiTMeter(gens[name].backbone.transformer, cpu_clock, ctx.device)
    first = gens["none"]
    loras = first.predict_loras(fixtures.reference_clips(videos, s["num_frames"], s["height"], seed=8))
    prompts = [fixtures.PROMPTS[i % len(fixtures.PROMPTS)] for i in range(videos)]

    def ours(name):
        gen = gens[name]
        return lambda: [gen.generate([GenerationRequest(prompts[i], lora=loras[i], seed=i)])[0] for i in range(videos)]

    # the stock pipeline with the first video's LoRA loaded once (the cheapest stock case: no swap per video)
    lora_path = os.path.join(ctx.work, "step_cost_lora.safetensors")
    with open(lora_path, "wb") as f:
        f.write(export_lora_bytes(first.model, loras[0].a_pred, loras[0].b_pred, 1.0))
    pipe = DiffusionPipeline.from_pretrained(backbone_dir, dtype=first.backbone.dtype).to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_path, adapter_name="reference")
    meters["stock"] = DiTMeter(pipe.transformer, cpu_clock, ctx.device)

    @torch.no_grad()
    def stock():
        out = []
        for i in range(videos):
            latents = pipe(prompt=[prompts[i]], negative_prompt=[""], num_frames=s["num_frames"], height=s["height"],
                           width=s["width"], num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"],
                           generator=[torch.Generator("cpu").manual_seed(i)], output_type="latent",
                           max_sequence_length=first.backbone.max_text_len, return_dict=False)[0]
            out.append(pipe.decode_latents(latents).float().clamp(-1, 1)[0].cpu())
        return out

    candidates = {name: ours(name) for name in gens}
    candidates["stock"] = stock
    # untimed first round: compiles, builds factors, and gives each option's videos for the quality comparison
    outputs = {name: fn() for name, fn in candidates.items()}
    for m in meters.values():
        m.take()
    dit: dict[str, list[tuple[int, float]]] = {n: [] for n in candidates}
    timed = {}
    for name, fn in candidates.items():
        def run(name=name, fn=fn):
            fn()
            dit[name].append(meters[name].take())
        timed[name] = run
    cpu: dict[str, list[float]] = {}
    wall = measure.interleaved(timed, rounds=a.cost_rounds, warmup=0, cpu=cpu)
    plain = outputs["none"]
    details = {"preset": label, "videos": videos, "rounds": a.cost_rounds, "generation": s,
               "clock": "cpu" if cpu_clock else "wall", "default": dataclasses.asdict(resolved(GenerationConfig())),
               "stock_vs_none_max_abs_diff": float((outputs["stock"][0] - plain[0]).abs().max()),
               "options": {}}
    stock_dit = [sec for _, sec in dit["stock"]]
    table = []
    for name in candidates:
        rows = dit[name][0][0] / videos  # full DiT evaluations (one row through every block) per video
        seconds = [sec for _, sec in dit[name]]
        d = {"dit_evaluations_per_video": rows, "dit_s_per_video": measure.median(seconds) / videos,
             "wall_s_per_video": measure.median(wall[name]) / videos,
             "cpu_s_per_video": measure.median(cpu[name]) / videos,
             "dit_vs_stock": measure.median_ratio(seconds, stock_dit),
             # the stock pipeline holds the first video's LoRA only: its first video is the comparable one
             "psnr_vs_uncached_db": (psnr(outputs[name][0], plain[0]) if name == "stock" else
                                     measure.median([psnr(v, p) for v, p in zip(outputs[name], plain)])),
             **({} if name == "stock" else {k: v for k, v in dataclasses.asdict(resolved(gens[name].config)).items()
                                            if k.startswith(("step_cache", "compile", "fuse"))})}
        details["options"][name] = d
        logger.info("item 8 %s: %.1f DiT evaluations/video, DiT %.3f s/video (%.2fx stock), PSNR %.1f dB", name, rows,
                    d["dit_s_per_video"], d["dit_vs_stock"], d["psnr_vs_uncached_db"])
        judged = name == "default"
        label = f"shipped default ({describe(gens['default'].config)})" if judged else name
        table.append(row(8, f"DiT compute per video vs stock diffusers + 1 LoRA, {label}, {details['preset']} "
                            f"({rows:.1f} DiT evaluations per video)", d["dit_vs_stock"], "x",
                         f"≤ {TARGETS['step_cost']}x" if judged else None,
                         (d["dit_vs_stock"] <= TARGETS["step_cost"]) if judged else None))
        if name != "none":
            table.append(row(8, f"PSNR of the video against the uncached one, {label}", d["psnr_vs_uncached_db"], "dB"))
    gens.clear()  # free the models before the next item
    return {"table": table, "details": details}


def describe(cfg) -> str:
    cfg = resolved(cfg)
    parts = [cfg.step_cache if cfg.step_cache != "none" else "no cache"]
    if cfg.step_cache in ("pyramid_attention", "faster", "taylorseer"):
        parts[0] += f" every {cfg.step_cache_interval}"
    if cfg.step_cache == "first_block":
        parts[0] += f" {cfg.step_cache_threshold}"
    if cfg.step_cache == "magcache":
        parts[0] += f" {cfg.step_cache_threshold}, at least every {cfg.step_cache_interval}"
    parts += ["compiled"] if cfg.compile_blocks else []
    parts += ["fused qkv"] if cfg.fuse_qkv else []
    return " + ".join(parts)

