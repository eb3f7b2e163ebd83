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
 7. resume at scale on a local S3 server (moto, loopback): 100,000 rows, half finished earlier: the driver's
    seconds and S3 requests before the first new row goes to Ray, and peak memory (quick: 2,000 rows).
 8. cheaper steps: DiT evaluations and DiT compute per video under each step cache, compiled blocks, fused q/k/v
    and the shipped default, against the stock diffusers pipeline with one LoRA loaded; PSNR against uncached.
 9. online app (Ray Serve, tiny preset, loopback): requests/s of 16 concurrent clients against the same 64 requests
    sent one at a time, p50/p95 latency, the mean batch size formed, requests lost.
Writes OUT/benchmark.json and OUT/benchmark.md (a table with Target and Met? columns) and prints the table.
A missed target is reported as missed, never hidden; the exit code is non-zero only if a measurement crashed.
"""

from __future__ import annotations

import argparse
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

from pipelines.benchmarks import fixtures, measure  # noqa: E402
from pipelines.benchmarks.context import TARGETS, Context  # noqa: E402
from pipelines.benchmarks.lightlora import bench_lightlora, bench_mixed_lora  # noqa: E402
from pipelines.benchmarks.pipeline import bench_pipeline  # noqa: E402
from pipelines.benchmarks.scale import bench_scale  # noqa: E402
from pipelines.benchmarks.serve import bench_serve  # noqa: E402
from pipelines.benchmarks.step_cost import bench_step_cost  # noqa: E402
from pipelines.benchmarks.training import bench_training  # noqa: E402

logger = logging.getLogger("benchmark")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny preset, few rows, one round")
    p.add_argument("--out", default="outputs/benchmark", help="where benchmark.json and benchmark.md go (local or s3://)")
    p.add_argument("--preset", choices=fixtures.PRESETS, default=None, help="backbone of items 1, 4, 6 (default small; quick: tiny)")
    p.add_argument("--rows", type=int, default=None, help="rows of the batch job in items 1, 4, 6 (default 48; quick 8)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per generation call of the batch job (items 1, 6)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    p.add_argument("--rounds", type=int, default=None, help="side-by-side rounds of items 1, 4, 6 (default 2; quick 1)")
    p.add_argument("--mixed-rows", type=int, default=None, help="rows of item 2 (default 16; quick 4)")
    p.add_argument("--mixed-batch-sizes", default=None, help="item 2 batch sizes (default 1,4,16; quick 1,4)")
    p.add_argument("--mixed-rounds", type=int, default=None, help="rounds of item 2 (default 3; quick 1)")
    p.add_argument("--step-rounds", type=int, default=None, help="interleaved forwards of item 3 (default 40; quick 10)")
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps of item 5 (default 16; quick 4)")
    p.add_argument("--cost-videos", type=int, default=None, help="videos per option in item 8 (default 2; quick 1)")
    p.add_argument("--cost-on", default="preset", choices=("preset", "trained"),
                   help="item 8's backbone: the seeded preset (random weights), or the bundled trained effects "
                        "backbone and checkpoint (video2lora/assets/checkpoint), where caches meet real features")
    p.add_argument("--cost-rounds", type=int, default=None, help="side-by-side rounds of item 8 (default 3; quick 1)")
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
    a.cost_videos = a.cost_videos or (1 if q else 2)
    a.cost_rounds = a.cost_rounds or (1 if q else 3)
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    return a


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
        measure.markdown_table(report["table"]),
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
              "machine": measure.machine(), "targets": TARGETS, "sections": {}, "table": [], "errors": {}}
    try:
        ctx.tiny_dir, ctx.tiny_gen = fixtures.save_backbone("tiny", os.path.join(work, "tiny"))
        ctx.tiny_ckpt = fixtures.save_checkpoint(ctx.tiny_dir, os.path.join(work, "tiny_ckpt"))
        if a.preset == "tiny":
            ctx.preset_dir, ctx.preset_gen, ctx.preset_ckpt = ctx.tiny_dir, dict(ctx.tiny_gen), ctx.tiny_ckpt
        else:
            ctx.preset_dir, ctx.preset_gen = fixtures.save_backbone(a.preset, os.path.join(work, a.preset))
            ctx.preset_ckpt = fixtures.save_checkpoint(ctx.preset_dir, os.path.join(work, f"{a.preset}_ckpt"))
        if a.steps:
            ctx.preset_gen["steps"] = a.steps
        sections = [("3", "lightlora", bench_lightlora), ("2", "mixed_lora", bench_mixed_lora),
                    ("1", "pipeline", bench_pipeline), ("5", "training", bench_training), ("7", "scale", bench_scale),
                    ("8", "step_cost", bench_step_cost), ("9", "serve", bench_serve)]
        for item, name, fn in sections:
            if item in a.skip or (item == "1" and {"1", "4", "6"} <= a.skip):
                continue
            logger.info("item %s (%s) ...", item, name)
            t0 = time.perf_counter()
            try:
                if item in ("1", "5", "9"):
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

        write_bytes_atomic(join(a.out, "benchmark.json"), measure.dumps(report).encode())
        md = render_markdown(report)
        write_bytes_atomic(join(a.out, "benchmark.md"), md.encode())
        print(md)
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
