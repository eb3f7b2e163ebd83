"""Items 3 (LightLoRA overhead: one DiT forward with per-sample LoRAs against the bare backbone, time and peak
memory) and 2 (mixed-LoRA batching against the same batch without LoRA and against stock diffusers)."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

from pipelines.benchmarks import fixtures, measure
from pipelines.benchmarks.context import (
    TARGETS,
    Context,
    alt,
    generator,
    row,
    sync,
    timed_ratio,
    use_cpu_clock,
)

logger = logging.getLogger("benchmark")  # not under "pipelines": the job quiets those loggers to warnings


# --------------------------------------------------------------------------------------------- item 3
def dit_inputs(backbone, videos: int, settings: dict, seed: int = 0):
    """What one CFG denoising step feeds the DiT for `videos` videos: 2 x videos rows."""
    tr, pipe = backbone.transformer, backbone.pipe
    f = (settings["num_frames"] - 1) // backbone.vae_scale_temporal + 1
    h, w = settings["height"] // backbone.vae_scale_spatial, settings["width"] // backbone.vae_scale_spatial
    g = torch.Generator().manual_seed(seed)
    rows = 2 * videos
    hs = torch.randn(rows, f, tr.config.in_channels, h, w, generator=g)
    text = torch.randn(rows, tr.config.max_text_seq_length, tr.config.text_embed_dim, generator=g)
    dev, dt = backbone.device, backbone.dtype
    rope = None
    if tr.config.use_rotary_positional_embeddings:
        rope = pipe._prepare_rotary_positional_embeddings(settings["height"], settings["width"], f, dev)
    t = torch.full((rows,), 500, device=dev)
    return dict(hidden_states=hs.to(dev, dt), encoder_hidden_states=text.to(dev, dt), timestep=t,
                image_rotary_emb=rope, return_dict=False)


@contextlib.contextmanager
def loras_paused(model):
    """The bare backbone for a moment, leaving the per-sample LoRAs (and their cached factors) in place."""
    from video2lora.lightlora import LightLoRALinear

    saved = [(m, m.lora) for m in model.modules() if isinstance(m, LightLoRALinear)]
    for m, _ in saved:
        m.lora = None
    try:
        yield
    finally:
        for m, lora in saved:
            m.lora = lora


def bench_lightlora(ctx: Context) -> dict:
    from video2lora.lightlora import per_sample_loras

    a = ctx.args
    cases = [("tiny", ctx.tiny_dir, ctx.tiny_ckpt, ctx.tiny_gen, [1, 4, 16], a.step_rounds)]
    if a.preset != "tiny":
        cases.append((a.preset, ctx.preset_dir, ctx.preset_ckpt, ctx.preset_gen, [1, 4], max(6, a.step_rounds // 4)))
    table, details = [], []
    for preset, bdir, ckpt, settings, sizes, rounds in cases:
        gen = generator(bdir, ckpt, settings, ctx.device)
        tr = gen.backbone.transformer
        weights = measure.module_bytes(tr)
        for b in sizes:
            inputs = dit_inputs(gen.backbone, b, settings)
            refs = fixtures.reference_clips(b, settings["num_frames"], settings["height"], seed=b)
            start = time.perf_counter()
            layers, _ = gen.materialize(gen.predict_loras(refs))
            sync(ctx.device)
            materialize_s = time.perf_counter() - start

            def step():
                with torch.no_grad():
                    out = tr(**inputs)[0]
                sync(ctx.device)
                return out

            with per_sample_loras(tr, gen.layer_names, layers, torch.ones(b, device=gen.backbone.device)):
                start = time.perf_counter()
                lora_out = step()  # the first step of a request also builds the per-row factors
                first_step_s = time.perf_counter() - start
                with loras_paused(tr):
                    bare_out = step()

                def bare():
                    with loras_paused(tr):
                        step()

                cpu: dict[str, list[float]] = {}
                times = measure.interleaved({"bare": bare, "lora": step}, rounds=rounds, warmup=1, cpu=cpu)
                with loras_paused(tr):
                    bare_peak = measure.peak_step_bytes(step, ctx.device)
                lora_peak = measure.peak_step_bytes(step, ctx.device)
                lora_state = measure.lora_state_bytes(tr)
            bare_mem, lora_mem = weights + bare_peak, weights + lora_state + lora_peak
            d = {
                "preset": preset, "videos": b, "dit_batch": 2 * b, "rounds": rounds,
                "bare_step_s": measure.spread(times["bare"]), "lora_step_s": measure.spread(times["lora"]),
                "bare_step_cpu_s": measure.spread(cpu["bare"]), "lora_step_cpu_s": measure.spread(cpu["lora"]),
                "time_overhead_wall": measure.median_ratio(times["lora"], times["bare"]) - 1,
                "time_overhead_cpu": measure.median_ratio(cpu["lora"], cpu["bare"]) - 1,
                "first_lora_step_s": first_step_s, "materialize_s": materialize_s,
                "weights_bytes": weights, "lora_state_bytes": lora_state, "bare_peak_activation_bytes": bare_peak,
                "lora_peak_activation_bytes": lora_peak, "bare_total_bytes": bare_mem, "lora_total_bytes": lora_mem,
                "memory_overhead": lora_mem / bare_mem - 1,
                "lora_changes_output": float((lora_out - bare_out).abs().max()),
            }
            judged, other = timed_ratio(ctx, times, cpu, "lora", "bare")
            d["time_overhead"], d["clock"] = judged - 1, "cpu" if use_cpu_clock(ctx) else "wall"
            details.append(d)
            logger.info("item 3 %s b=%d: time %+.1f%% memory %+.2f%%", preset, b, 100 * d["time_overhead"],
                        100 * d["memory_overhead"])
            label = f"{preset}, {b} video{'s' if b > 1 else ''} (DiT batch {2 * b})"
            tgt = f"< +{100 * TARGETS['lightlora']:.0f} %"
            table.append(row(3, f"LightLoRA step time overhead, {label}", d["time_overhead"], "%", tgt,
                             d["time_overhead"] < TARGETS["lightlora"], **alt(ctx, other - 1)))
            table.append(row(3, f"LightLoRA step memory overhead, {label}", d["memory_overhead"], "%", tgt,
                             d["memory_overhead"] < TARGETS["lightlora"]))
        del gen
    return {"table": table, "details": details}


# --------------------------------------------------------------------------------------------- item 2
def bench_mixed_lora(ctx: Context) -> dict:
    from diffusers import DiffusionPipeline

    from video2lora.export import export_lora_bytes
    from video2lora.generate import GenerationRequest

    a, s = ctx.args, ctx.tiny_gen
    n = a.mixed_rows
    gen = generator(ctx.tiny_dir, ctx.tiny_ckpt, s, ctx.device)
    loras = gen.predict_loras(fixtures.reference_clips(n, s["num_frames"], s["height"], seed=2))
    prompts = [fixtures.PROMPTS[i % len(fixtures.PROMPTS)] for i in range(n)]

    def requests(with_lora):
        return [GenerationRequest(prompts[i], lora=loras[i] if with_lora else None, seed=i) for i in range(n)]

    def ours(b, with_lora):
        def run():
            reqs = requests(with_lora)
            for i in range(0, n, b):
                gen.generate(reqs[i: i + b])
        return run

    # the usual way: stock diffusers, each row's LoRA as a standard LoRA file (written before timing)
    lora_dir = os.path.join(ctx.work, "stock_loras")
    os.makedirs(lora_dir, exist_ok=True)
    paths = []
    for i, lora in enumerate(loras):
        paths.append(os.path.join(lora_dir, f"row{i}.safetensors"))
        with open(paths[-1], "wb") as f:
            f.write(export_lora_bytes(gen.model, lora.a_pred, lora.b_pred, 1.0))
    pipe = DiffusionPipeline.from_pretrained(ctx.tiny_dir, dtype=gen.backbone.dtype).to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    text_len = gen.backbone.max_text_len

    @torch.no_grad()  # as ours: no autograd bookkeeping in the stock pipeline's VAE decode either
    def stock_row(i):
        pipe.load_lora_weights(paths[i], adapter_name=f"row{i}")
        latents = pipe(prompt=[prompts[i]], negative_prompt=[""], num_frames=s["num_frames"], height=s["height"],
                       width=s["width"], num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"],
                       generator=[torch.Generator("cpu").manual_seed(i)], output_type="latent",
                       max_sequence_length=text_len, return_dict=False)[0]
        video = pipe.decode_latents(latents).float().clamp(-1, 1)[0].cpu()
        pipe.unload_lora_weights()
        return video

    def stock():
        for i in range(n):
            stock_row(i)

    # warm up both, and check that the two ways make the same video (the comparison is like for like)
    same = float((stock_row(0) - gen.generate(requests(True)[:1])[0]).abs().max())
    candidates = {"stock": stock}
    for b in a.mixed_batch_sizes:
        candidates[f"lora_b{b}"] = ours(b, True)
        candidates[f"nolora_b{b}"] = ours(b, False)
    cpu: dict[str, list[float]] = {}
    times = measure.interleaved(candidates, rounds=a.mixed_rounds, warmup=0, cpu=cpu)
    rps = {k: [n / t for t in v] for k, v in times.items()}
    details = {"rows": n, "rounds": a.mixed_rounds, "generation": s, "stock_vs_ours_max_abs_diff": same,
               "clock": "cpu" if use_cpu_clock(ctx) else "wall",
               "seconds": {k: measure.spread(v) for k, v in times.items()},
               "cpu_seconds": {k: measure.spread(v) for k, v in cpu.items()},
               "rows_per_s": {k: measure.median(v) for k, v in rps.items()},
               "rows_per_cpu_s": {k: measure.median([n / t for t in v]) for k, v in cpu.items()}, "batch_sizes": {}}
    table = [row(2, "stock diffusers loop (load_lora_weights, generate, unload per row), tiny (wall)",
                 measure.median(rps["stock"]), "rows/s")]
    for b in a.mixed_batch_sizes:
        lora_cost, lora_cost_other = timed_ratio(ctx, times, cpu, f"lora_b{b}", f"nolora_b{b}")
        vs_stock, vs_stock_other = timed_ratio(ctx, times, cpu, "stock", f"lora_b{b}")
        lora_cost, lora_cost_other = lora_cost - 1, lora_cost_other - 1
        details["batch_sizes"][b] = {"lora_vs_nolora": lora_cost, "speedup_vs_stock": vs_stock,
                                     "lora_vs_nolora_other_clock": lora_cost_other,
                                     "speedup_vs_stock_other_clock": vs_stock_other}
        table.append(row(2, f"ours, every row its own LoRA, batch {b}, tiny (wall)", measure.median(rps[f"lora_b{b}"]),
                         "rows/s"))
        table.append(row(2, f"per-row LoRAs vs the same batch without LoRA, batch {b}", lora_cost, "%",
                         f"≤ +{100 * TARGETS['lora_vs_nolora']:.0f} %", lora_cost <= TARGETS["lora_vs_nolora"],
                         **alt(ctx, lora_cost_other)))
        at16 = b == 16
        table.append(row(2, f"speed-up over the stock diffusers loop, batch {b}", vs_stock, "x",
                         f"≥ {TARGETS['vs_stock_b16']}x" if at16 else None,
                         (vs_stock >= TARGETS["vs_stock_b16"]) if at16 else None, **alt(ctx, vs_stock_other)))
    if 1 in a.mixed_batch_sizes:
        judged, other = timed_ratio(ctx, times, cpu, "stock", "nolora_b1")
        details["stock_vs_bare_one_by_one"] = judged
        table.append(row(2, "stock loop time / bare one-by-one generation (cost of load/unload)", judged, "x",
                         **alt(ctx, other)))
        big = max(a.mixed_batch_sizes)
        if big > 1:
            judged, other = timed_ratio(ctx, times, cpu, "nolora_b1", f"nolora_b{big}")
            details["batched_vs_one_by_one"] = judged
            table.append(row(2, f"bare generation, batch {big} vs one by one (what batching alone gives)", judged, "x",
                             **alt(ctx, other)))
    del pipe, gen
    return {"table": table, "details": details}
