"""Benchmarks: how close the batch pipeline gets to the backbone's own compute, and how it beats the usual way.

    python jobs/benchmark.py                       # full run, "small" preset (about 25-40 min on 2 CPU cores)
    python jobs/benchmark.py --quick               # CI smoke run on the tiny preset (under 3 min)
    ray job submit --entrypoint-num-gpus 1 -- python jobs/benchmark.py --out s3://...   # on a cluster

Measured side by side in one run (candidates interleaved and repeated; medians and median per-round ratios):
 1. pipeline efficiency: wall time of the Ray batch job on N rows / the denoising loop alone of the same rows
    (one process, same batches, no I/O); also steady state (from the first batch out) and start-up latency.
 2. mixed-LoRA batching (tiny preset): rows/s of `Video2LoRAGenerator.generate` with a different LoRA per row at
    batch 1/4/16, against the same batch without LoRA and against stock diffusers (per row: load_lora_weights,
    generate, unload_lora_weights).
 3. LightLoRA overhead: one DiT forward (CFG batch) with per-sample LoRAs on every adapted layer against the bare
    backbone: time and peak memory.
 4. hypernetwork stage cost per row relative to generation, and the reference cache's hit rate.
 5. training: samples/s of 2-worker ZeRO-2 (Ray Train + DeepSpeed) against the single-process loop; peak memory
    per worker.
 6. scaling: rows/s of the batch job with 1 and 2 generation actors.
Writes OUT/benchmark.json and OUT/benchmark.md (a table with Target and Met? columns) and prints the table.
A missed target is reported as missed, never hidden; the exit code is non-zero only if a measurement crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from pipelines import bench  # noqa: E402

logger = logging.getLogger("benchmark")

TARGETS = {"pipeline_ratio": 1.15, "lora_vs_nolora": 0.05, "vs_stock_b16": 2.5, "lightlora": 0.05}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny preset, few rows, one round")
    p.add_argument("--out", default="outputs/benchmark", help="where benchmark.json and benchmark.md go (local or s3://)")
    p.add_argument("--preset", choices=bench.PRESETS, default=None, help="backbone of items 1, 4, 6 (default small; quick: tiny)")
    p.add_argument("--rows", type=int, default=None, help="rows of the batch job in items 1, 4, 6 (default 48; quick 8)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per generation call of the batch job (items 1, 6)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    p.add_argument("--rounds", type=int, default=None, help="side-by-side rounds of items 1, 4, 6 (default 2; quick 1)")
    p.add_argument("--mixed-rows", type=int, default=None, help="rows of item 2 (default 16; quick 4)")
    p.add_argument("--mixed-batch-sizes", default=None, help="item 2 batch sizes (default 1,4,16; quick 1,4)")
    p.add_argument("--mixed-rounds", type=int, default=None, help="rounds of item 2 (default 3; quick 1)")
    p.add_argument("--step-rounds", type=int, default=None, help="interleaved forwards of item 3 (default 40; quick 10)")
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps of item 5 (default 16; quick 4)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every measured process (driver, actors, workers); the same everywhere "
                        "so no comparison is about thread counts. On a shared 2-core machine 1 is fastest.")
    p.add_argument("--skip", default="", help="comma-separated items not to run, e.g. 5,6")
    p.add_argument("--work", default="", help="scratch dir (default: a temporary dir, removed at the end)")
    p.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS (ray job submit), else a local Ray")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: this machine's)")
    a = p.parse_args(argv)
    q = a.quick
    a.preset = a.preset or ("tiny" if q else "small")
    a.rows = a.rows or (8 if q else 48)
    a.rounds = a.rounds or (1 if q else 2)
    a.mixed_rows = a.mixed_rows or (4 if q else 16)
    a.mixed_batch_sizes = [int(x) for x in (a.mixed_batch_sizes or ("1,4" if q else "1,4,16")).split(",")]
    a.mixed_rounds = a.mixed_rounds or (1 if q else 3)
    a.step_rounds = a.step_rounds or (10 if q else 40)
    a.train_steps = a.train_steps or (4 if q else 16)
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    return a


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
    w, c = bench.median_ratio(wall[num], wall[den]), bench.median_ratio(cpu[num], cpu[den])
    return (c, w) if use_cpu_clock(ctx) else (w, c)


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
        weights = bench.module_bytes(tr)
        for b in sizes:
            inputs = dit_inputs(gen.backbone, b, settings)
            refs = bench.reference_clips(b, settings["num_frames"], settings["height"], seed=b)
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
                times = bench.interleaved({"bare": bare, "lora": step}, rounds=rounds, warmup=1, cpu=cpu)
                with loras_paused(tr):
                    bare_peak = bench.peak_step_bytes(step, ctx.device)
                lora_peak = bench.peak_step_bytes(step, ctx.device)
                lora_state = bench.lora_state_bytes(tr)
            bare_mem, lora_mem = weights + bare_peak, weights + lora_state + lora_peak
            d = {
                "preset": preset, "videos": b, "dit_batch": 2 * b, "rounds": rounds,
                "bare_step_s": bench.spread(times["bare"]), "lora_step_s": bench.spread(times["lora"]),
                "bare_step_cpu_s": bench.spread(cpu["bare"]), "lora_step_cpu_s": bench.spread(cpu["lora"]),
                "time_overhead_wall": bench.median_ratio(times["lora"], times["bare"]) - 1,
                "time_overhead_cpu": bench.median_ratio(cpu["lora"], cpu["bare"]) - 1,
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
    loras = gen.predict_loras(bench.reference_clips(n, s["num_frames"], s["height"], seed=2))
    prompts = [bench.PROMPTS[i % len(bench.PROMPTS)] for i in range(n)]

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
    times = bench.interleaved(candidates, rounds=a.mixed_rounds, warmup=0, cpu=cpu)
    rps = {k: [n / t for t in v] for k, v in times.items()}
    details = {"rows": n, "rounds": a.mixed_rounds, "generation": s, "stock_vs_ours_max_abs_diff": same,
               "clock": "cpu" if use_cpu_clock(ctx) else "wall",
               "seconds": {k: bench.spread(v) for k, v in times.items()},
               "cpu_seconds": {k: bench.spread(v) for k, v in cpu.items()},
               "rows_per_s": {k: bench.median(v) for k, v in rps.items()},
               "rows_per_cpu_s": {k: bench.median([n / t for t in v]) for k, v in cpu.items()}, "batch_sizes": {}}
    table = [row(2, "stock diffusers loop (load_lora_weights, generate, unload per row), tiny (wall)",
                 bench.median(rps["stock"]), "rows/s")]
    for b in a.mixed_batch_sizes:
        lora_cost, lora_cost_other = timed_ratio(ctx, times, cpu, f"lora_b{b}", f"nolora_b{b}")
        vs_stock, vs_stock_other = timed_ratio(ctx, times, cpu, "stock", f"lora_b{b}")
        lora_cost, lora_cost_other = lora_cost - 1, lora_cost_other - 1
        details["batch_sizes"][b] = {"lora_vs_nolora": lora_cost, "speedup_vs_stock": vs_stock,
                                     "lora_vs_nolora_other_clock": lora_cost_other,
                                     "speedup_vs_stock_other_clock": vs_stock_other}
        table.append(row(2, f"ours, every row its own LoRA, batch {b}, tiny (wall)", bench.median(rps[f"lora_b{b}"]),
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


# --------------------------------------------------------------------------------------------- items 1, 4, 6
def baseline_run(ctx: Context, refs: dict, table: list[dict], s: dict) -> dict:
    """The same generations in one process: LoRAs predicted (timed apart, item 4), then the rows in the batch job's
    batches; the denoising loop alone is what the pipeline is measured against."""
    from video2lora.generate import GenerationRequest, GenerationTimings

    a = ctx.args
    start = time.perf_counter()
    gen = generator(ctx.preset_dir, ctx.preset_ckpt, s, ctx.device)
    load_s = time.perf_counter() - start
    distinct = sorted(refs)
    start = time.perf_counter()
    predicted = dict(zip(distinct, gen.predict_loras([refs[k] for k in distinct], batch_size=8)))
    sync(ctx.device)
    hyper_s = time.perf_counter() - start
    reqs = [GenerationRequest(r["prompt"], lora=predicted[r["reference_uri"]], seed=r["seed"]) for r in table]
    timings = GenerationTimings()
    start = time.perf_counter()
    for i in range(0, len(reqs), a.batch_size):
        gen.generate(reqs[i: i + a.batch_size], timings=timings)
    sync(ctx.device)
    total = time.perf_counter() - start
    del gen
    return {"load_s": load_s, "hypernet_s": hyper_s, "hypernet_s_per_reference": hyper_s / len(distinct),
            "generate_s": total, "denoise_s": timings.seconds["denoise"], "decode_s": timings.seconds["decode"],
            "generate_s_per_row": total / len(reqs), "denoise_s_per_row": timings.seconds["denoise"] / len(reqs)}


def pipeline_run(ctx: Context, manifest: str, s: dict, actors: int, tag: str) -> dict:
    import pandas as pd
    import ray

    from pipelines.batch import run_batch_job
    from pipelines.config import BatchJobConfig
    from video2lora.config import GenerationConfig

    a = ctx.args
    out = os.path.join(ctx.work, "batch_out", tag)
    shutil.rmtree(out, ignore_errors=True)
    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= actors else 0.0
    cfg = BatchJobConfig(backbone=ctx.preset_dir, checkpoint=ctx.preset_ckpt, output=out,
                         generation=GenerationConfig(**s), batch_size=a.batch_size, hyper_batch_size=8,
                         num_gen_actors=actors, gen_num_gpus=gpus, torch_threads=a.threads)
    since = time.time()
    summary = run_batch_job(manifest, cfg, progress=False)
    res = pd.read_parquet(os.path.join(out, "results.parquet"))
    ok = res[res.status == "ok"]
    finish = bench.row_finish_times(out, since)
    return {
        "actors": actors, "wall_s": summary["wall_s"], "rows_ok": summary["ok"], "rows_failed": summary["failed"],
        "rows_per_s": summary["rows_per_s"], "generation_busy_fraction": summary["generation_busy_fraction"],
        **bench.steady_state(finish, a.batch_size),
        "generation_batches": bench.generation_batches(res), "workers": sorted(set(ok.gen_worker)),
        "cache_hit_rate": float(ok.lora_cache_hit.astype(bool).mean()) if len(ok) else float("nan"),
        "mean_s": {c: float(ok[c].mean()) for c in ("t_fetch_s", "t_hypernet_s", "t_generate_s", "t_write_s")},
        "errors": res[res.status == "failed"].error.head(3).tolist(),
    }


def bench_pipeline(ctx: Context) -> dict:
    import ray

    from video2lora.video_io import read_video

    a, s = ctx.args, ctx.preset_gen
    distinct = max(1, a.rows // 2)
    manifest, rows = bench.write_batch_manifest(os.path.join(ctx.work, "batch_in"), a.rows, distinct,
                                                s["num_frames"], s["height"], seed=3)
    # references exactly as the pipeline hands them on: decoded at the job's size, shipped as uint8
    refs = {}
    for r in rows:
        if r["reference_uri"] not in refs:
            v = read_video(os.path.join(os.path.dirname(manifest), r["reference_uri"]), s["num_frames"], s["height"],
                           s["width"])
            refs[r["reference_uri"]] = ((v + 1) * 127.5).round() / 127.5 - 1
    if not a.quick:  # one untimed run first: Ray Data's per-cluster helper actors start once, not in a timed run
        warm, _ = bench.write_batch_manifest(os.path.join(ctx.work, "batch_warm"), a.batch_size, 1, s["num_frames"],
                                             s["height"], seed=4)
        logger.info("items 1/4/6: warm-up run (untimed)")
        pipeline_run(ctx, warm, s, 1, "warm")
    runs = {"baseline": lambda: baseline_run(ctx, refs, rows, s)}
    runs["pipeline_1_actor"] = lambda: pipeline_run(ctx, manifest, s, 1, "a1")
    two = "6" not in a.skip and (ray.cluster_resources().get("GPU", 0) >= 2 or ctx.device.type == "cpu")
    if two:
        runs["pipeline_2_actors"] = lambda: pipeline_run(ctx, manifest, s, 2, "a2")
    results: dict[str, list[dict]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            logger.info("items 1/4/6 round %d: %s", r + 1, name)
            results[name].append(runs[name]())
            logger.info("  %s", json.dumps({k: v for k, v in results[name][-1].items() if not isinstance(v, (dict, list))}))
    base, p1 = results["baseline"], results["pipeline_1_actor"]
    for p in p1 + results.get("pipeline_2_actors", []):
        if p["rows_failed"]:
            raise RuntimeError(f"the batch job failed rows: {p['errors']}")

    def per_round(f):
        return [f(b, p) for b, p in zip(base, p1)]

    ratio = bench.median(per_round(lambda b, p: p["wall_s"] / b["denoise_s"]))
    steady = bench.median(per_round(lambda b, p: p["steady_s_per_row"] / b["denoise_s_per_row"]))
    vs_generate = bench.median(per_round(lambda b, p: p["wall_s"] / b["generate_s"]))
    first_out = bench.median([p["first_row_out_s"] for p in p1])
    label = f"{a.rows} rows, {a.preset} preset, {s['steps']} steps, batch {a.batch_size}"
    table = [
        row(1, f"batch job wall / denoising loop alone ({label})", ratio, "x", f"≤ {TARGETS['pipeline_ratio']}",
            ratio <= TARGETS["pipeline_ratio"]),
        row(1, "  same, steady state (from the first batch out; start-up left out)", steady, "x"),
        row(1, "  batch job wall / whole in-process generation (text + denoise + VAE decode)", vs_generate, "x"),
        row(1, "  start-up: first row out after (actor start, model load, first batch)", first_out, "s"),
        row(1, "  in-process model load", bench.median([b["load_s"] for b in base]), "s"),
    ]
    # item 4
    hyper_rel = bench.median([b["hypernet_s_per_reference"] / b["generate_s_per_row"] for b in base])
    hyper_pipe = bench.median([p["mean_s"]["t_hypernet_s"] / p["mean_s"]["t_generate_s"] for p in p1])
    hit = bench.median([p["cache_hit_rate"] for p in p1])
    ideal = 1 - distinct / a.rows
    table += [
        row(4, f"hypernetwork (VAE encode + hypernet) per reference / generation per row, in-process", hyper_rel, "x"),
        row(4, "  same in the batch job (t_hypernet_s / t_generate_s per row)", hyper_pipe, "x"),
        row(4, f"reference cache hit rate ({a.rows} rows, {distinct} distinct references)", hit, "%hit",
            f"{100 * ideal:.0f} % (every repeat)", abs(hit - ideal) < 1e-9),
    ]
    details = {"rows": a.rows, "distinct_references": distinct, "batch_size": a.batch_size, "generation": s,
               "runs": results, "ratio_wall_to_denoise": ratio, "ratio_steady_to_denoise": steady,
               "ratio_wall_to_generate": vs_generate, "hypernet_vs_generation": hyper_rel,
               "hypernet_vs_generation_in_job": hyper_pipe, "cache_hit_rate": hit, "cache_hit_rate_ideal": ideal}
    # item 6
    if two:
        p2 = results["pipeline_2_actors"]
        scale = bench.median([b["rows_per_s"] / a1["rows_per_s"] for a1, b in zip(p1, p2)])
        scale_steady = bench.median([a1["steady_s_per_row"] / b["steady_s_per_row"] for a1, b in zip(p1, p2)])
        details.update(scaling_rows_per_s=scale, scaling_steady=scale_steady)
        table += [
            row(6, f"rows/s, 1 generation actor ({label})", bench.median([p["rows_per_s"] for p in p1]), "rows/s"),
            row(6, "rows/s, 2 generation actors", bench.median([p["rows_per_s"] for p in p2]), "rows/s"),
            row(6, f"2 actors / 1 actor (wall; {os.cpu_count()} CPU cores, {a.threads} thread(s) per actor)", scale, "x"),
            row(6, "  same, steady state", scale_steady, "x"),
        ]
    return {"table": table, "details": details}


# --------------------------------------------------------------------------------------------- item 5
def _single_process_training(prepared: str, backbone: str, train: dict, steps: int, batch: int, threads: int) -> dict:
    """Runs in a fresh Ray actor process, so its peak memory is its own."""
    torch.set_num_threads(threads)
    from video2lora.backbones import Backbone
    from video2lora.config import TrainConfig
    from video2lora.generate import new_model_for
    from video2lora.training import PreparedData, train_single_process

    data = PreparedData.load(prepared)
    bb = Backbone.from_pretrained(backbone, device="cuda" if torch.cuda.is_available() else "cpu")
    model = new_model_for(bb, seed=train.get("seed", 0))
    rows = train_single_process(model, bb, data, TrainConfig(**train), max_steps=steps, batch_size=batch, log_every=0)
    timed = rows[1:] or rows  # the first step warms up
    params = sum(p.numel() for p in model.parameters())
    return {"samples_per_s": batch * len(timed) / sum(batch / r["samples_per_s"] for r in timed),
            "peak_rss_bytes": bench.peak_rss_bytes(), "optimizer_state_bytes": 2 * 4 * params,
            "trainable_params": params, "final_loss": rows[-1]["loss"], "threads": torch.get_num_threads()}


class SingleProcessTraining:
    def run(self, *args) -> dict:
        return _single_process_training(*args)


def bench_training(ctx: Context) -> dict:
    try:
        import ray

        from pipelines.prepare import prepare
        from video2lora.effects.dataset import write_training_clips
        from pipelines.train import TrainJobConfig, run_training
        from video2lora.config import TrainConfig
    except Exception as e:  # noqa: BLE001 - the training job is optional for this benchmark
        return not_measured(5, f"training job not importable ({type(e).__name__}: {e})")
    a = ctx.args
    try:
        manifest = write_training_clips(os.path.join(ctx.work, "train_clips"), seed=0,
                                        clips_per_effect=2 if a.quick else 4)
        prepared = prepare(manifest, ctx.tiny_dir, os.path.join(ctx.work, "prepared")).uri
        train = dict(lr=1e-3, grad_clip=1.0, seed=0, mixed_precision="fp32")
        workers, global_batch = 2, 2
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
        # in a fresh actor process of its own, so its peak memory is the loop's and nothing else's
        single = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(SingleProcessTraining).remote()
        ref = single.run.remote(prepared, ctx.tiny_dir, train, a.train_steps, global_batch, a.threads)
        single_res = ray.get(ref)
        ray.kill(single)
        job = TrainJobConfig(prepared=prepared, backbone=ctx.tiny_dir, storage_path=os.path.join(ctx.work, "train_runs"),
                             name="bench-zero2", num_workers=workers, use_gpu=use_gpu,
                             cpus_per_worker=1.0 if use_gpu else 0.5, data_cpus=0.25, log_every=0,
                             train=TrainConfig(**train, batch_size=global_batch // workers, max_steps=a.train_steps,
                                               checkpoint_every=10**6))
        with bench.ProcessPeakMemory("RayTrainWorker") as mem:
            start = time.perf_counter()
            info = run_training(job)
            wall = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001
        logger.warning("item 5 not measured: %s", traceback.format_exc())
        return not_measured(5, f"{type(e).__name__}: {e}")
    peaks = sorted(mem.peaks.values(), reverse=True)[:workers]
    zero_sps = float(info["samples_per_s"])
    per_rank = info.get("per_rank_optimizer_state") or []
    details = {"steps": a.train_steps, "global_batch": global_batch, "workers": workers, "train": train,
               "single_process": single_res, "zero2": {k: v for k, v in info.items() if k != "deepspeed_config"},
               "zero2_wall_s": wall, "zero2_worker_peak_rss_bytes": peaks}
    table = [
        row(5, f"single-process loop, global batch {global_batch} (tiny, {a.threads} thread)", single_res["samples_per_s"], "samples/s"),
        row(5, f"{workers}-worker ZeRO-2 (Ray Train + DeepSpeed), same global batch", zero_sps, "samples/s"),
        row(5, "  ZeRO-2 / single process", zero_sps / single_res["samples_per_s"], "x"),
        row(5, "  peak RSS per ZeRO-2 worker (max over workers)", max(peaks) / 2**20 if peaks else None, "MiB"),
        row(5, "  peak RSS of the single process", single_res["peak_rss_bytes"] / 2**20, "MiB"),
    ]
    if per_rank:  # AdamW moments: ZeRO-2 partitions them (and the fp32 master copy) across the ranks
        moments = max(r.get("moments_numel", 0) for r in per_rank)
        table.append(row(5, "  AdamW moments held per ZeRO-2 rank / by the single process",
                         moments / (2 * single_res["trainable_params"]), "x", f"1/{workers} (partitioned)",
                         abs(moments / (2 * single_res["trainable_params"]) - 1 / workers) < 0.01))
    return {"table": table, "details": details}


def not_measured(item, reason: str) -> dict:
    return {"table": [row(item, f"not measured: {reason}", None)], "details": {"not_measured": reason}}


# --------------------------------------------------------------------------------------------- driver
def start_ray(a: argparse.Namespace):
    from pipelines.common import init_ray

    cpus = a.ray_cpus or os.cpu_count() or 1
    # more worker processes than CPUs (the stage actors + task workers) is normal on a small machine: keep idle
    # task workers alive instead of killing them and paying a fresh process (imports) later
    init_ray(a.ray_address, num_cpus=cpus, log_to_driver=False, include_dashboard=False,
             env_vars={"RAY_AUTH_MODE": "disabled"}, system_config={"num_workers_soft_limit": 4 * cpus}, attempts=3)


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Benchmark ({'quick' if report['args']['quick'] else 'full'} run, {report['finished']})",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cpus')} CPU cores, {m.get('memory_gib', '?')} GiB"
        + (f", {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f"; torch {m.get('torch')}, diffusers {m.get('diffusers')}, ray {m.get('ray')}; "
        f"{report['args']['threads']} torch thread(s) per process; 1-min load average at start {m.get('load_avg_1m', 0):.1f}.",
        "",
        f"Command: `python jobs/benchmark.py {' '.join(report['argv'])}`".replace("benchmark.py `", "benchmark.py`"),
        "",
        bench.markdown_table(report["table"]),
        "",
    ]
    if any(r.get("alt_label") == "wall" for r in report["table"]):
        lines += ["Items 2 and 3 compare runs in one process with one torch thread and are judged on that process's "
                  "CPU time (on an idle machine the same as wall time; on a shared one far less disturbed by other "
                  "processes); the wall-time result follows in brackets. Every comparison ran its candidates "
                  "interleaved; values are medians of per-round ratios.", ""]
    missed = [r for r in report["table"] if r.get("met") is False]
    if missed:
        lines.append("Missed: " + "; ".join(f"item {r['item']} {r['name'].strip()}" for r in missed) + ".")
    if report["errors"]:
        lines.append("Errors: " + "; ".join(f"item {k}: {v.splitlines()[-1]}" for k, v in report["errors"].items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "ray", "video2lora", "pipelines"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    started = time.perf_counter()
    work = a.work or tempfile.mkdtemp(prefix="v2l-bench-")
    os.makedirs(work, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Context(a, work, device)
    report = {"argv": argv, "args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(a).items()},
              "machine": bench.machine(), "targets": TARGETS, "sections": {}, "table": [], "errors": {}}
    try:
        ctx.tiny_dir, ctx.tiny_gen = bench.save_backbone("tiny", os.path.join(work, "tiny"))
        ctx.tiny_ckpt = bench.save_checkpoint(ctx.tiny_dir, os.path.join(work, "tiny_ckpt"))
        if a.preset == "tiny":
            ctx.preset_dir, ctx.preset_gen, ctx.preset_ckpt = ctx.tiny_dir, dict(ctx.tiny_gen), ctx.tiny_ckpt
        else:
            ctx.preset_dir, ctx.preset_gen = bench.save_backbone(a.preset, os.path.join(work, a.preset))
            ctx.preset_ckpt = bench.save_checkpoint(ctx.preset_dir, os.path.join(work, f"{a.preset}_ckpt"))
        if a.steps:
            ctx.preset_gen["steps"] = a.steps
        sections = [("3", "lightlora", bench_lightlora), ("2", "mixed_lora", bench_mixed_lora),
                    ("1", "pipeline", bench_pipeline), ("5", "training", bench_training)]
        for item, name, fn in sections:
            if item in a.skip or (item == "1" and {"1", "4", "6"} <= a.skip):
                continue
            logger.info("item %s (%s) ...", item, name)
            t0 = time.perf_counter()
            try:
                if item in ("1", "5"):
                    start_ray(a)
                out = fn(ctx)
            except Exception:  # noqa: BLE001 - report it, run the other items
                report["errors"][item] = traceback.format_exc()
                logger.error("item %s failed:\n%s", item, report["errors"][item])
                continue
            out["details"] = {"seconds": time.perf_counter() - t0, "result": out["details"]}
            report["sections"][name] = out["details"]
            report["table"] += out["table"]
    finally:
        report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        report["seconds"] = time.perf_counter() - started
        report["table"].sort(key=lambda r: int(r["item"]))  # stable: each item's rows keep their order
        from video2lora.storage import join, write_bytes_atomic

        write_bytes_atomic(join(a.out, "benchmark.json"), bench.dumps(report).encode())
        md = render_markdown(report)
        write_bytes_atomic(join(a.out, "benchmark.md"), md.encode())
        print(md)
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
