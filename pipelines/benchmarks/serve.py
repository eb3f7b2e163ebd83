"""Item 9: the online app (pipelines/serve.py) on the tiny preset, loopback only. The same requests (8 distinct
references, a seed each) sent by 16 concurrent clients and then one at a time, against one local Serve instance:
requests/s of each, p50 / p95 latency of the concurrent pass, the mean batch size the generator formed, and
requests lost (anything but a 200). Bounded: 64 requests (quick: 16), every client with a timeout."""

from __future__ import annotations

import concurrent.futures as futures
import socket
import time

from pipelines.benchmarks import fixtures
from pipelines.benchmarks.context import Context, row

TARGETS = {"lost": 0}


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


def bench_serve(ctx: Context) -> dict:
    import requests
    from ray import serve

    from pipelines.config import ServeConfig
    from pipelines.serve import build_app
    from video2lora.config import GenerationConfig
    from video2lora.video_io import encode_video

    q = ctx.args.quick
    total, clients, batch = (16, 4, 4) if q else (64, 16, 8)
    s = ctx.tiny_gen
    refs = [encode_video(c) for c in fixtures.reference_clips(8, s["num_frames"], s["height"], seed=9)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    cfg = ServeConfig(backbone=ctx.tiny_dir, checkpoint=ctx.tiny_ckpt, generation=GenerationConfig(**s),
                      batch_size=batch, batch_wait_timeout_s=0.05, replica_num_cpus=0.25,
                      torch_threads=ctx.args.threads, max_queued_requests=2 * total)
    try:
        serve.run(build_app(cfg), name="video2lora", route_prefix="/")

        def send(i: int) -> tuple[int, float, int]:
            start = time.perf_counter()
            try:
                r = requests.post(f"{url}/generate", files={"reference": ("ref.mp4", refs[i % len(refs)])},
                                  data={"prompt": fixtures.PROMPTS[i % len(fixtures.PROMPTS)], "seed": str(i)},
                                  timeout=300)
                return r.status_code, time.perf_counter() - start, int(r.headers.get("x-batch-size", 0))
            except requests.RequestException:
                return 0, time.perf_counter() - start, 0

        for i in range(len(refs)):  # warm: every reference's LoRA cached, every replica's first call paid
            send(i)
        t0 = time.perf_counter()
        alone = [send(i) for i in range(total)]
        t_alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        with futures.ThreadPoolExecutor(clients) as pool:
            together = list(pool.map(send, range(total)))
        t_together = time.perf_counter() - t0
    finally:
        serve.shutdown()
    ok = [r for r in together if r[0] == 200]
    lost = total - len(ok) + sum(r[0] != 200 for r in alone)
    rps, rps_alone = total / t_together, total / t_alone
    latency = [r[1] for r in ok]
    mean_batch = sum(r[2] for r in ok) / max(len(ok), 1)
    details = {"requests": total, "clients": clients, "batch_size": batch, "rps_concurrent": rps,
               "rps_one_at_a_time": rps_alone, "p50_s": _percentile(latency, 0.5), "p95_s": _percentile(latency, 0.95),
               "p50_alone_s": _percentile([r[1] for r in alone], 0.5), "mean_batch_size": mean_batch, "lost": lost,
               "status_codes": sorted({r[0] for r in together + alone}), "settings": s}
    table = [
        row(9, f"online app: requests/s, {clients} concurrent clients / one at a time ({total} requests: "
               f"{rps:.2f} vs {rps_alone:.2f} req/s)", rps / rps_alone, "x"),
        row(9, f"online app: latency p50 (concurrent; one at a time {details['p50_alone_s']:.2f} s)",
            details["p50_s"], "s"),
        row(9, "online app: latency p95 (concurrent)", details["p95_s"], "s"),
        row(9, f"online app: mean batch size formed (at most {batch})", mean_batch),
        row(9, "online app: requests lost", lost, target="0", met=lost == TARGETS["lost"]),
    ]
    return {"table": table, "details": details}
