"""Serve Video2LoRA online (Ray Serve): POST /generate -> mp4, POST /lora -> LoRA file, GET /healthz.

    python jobs/serve.py                      # the embedded default (bundled backbone + checkpoint), 127.0.0.1:8000
    curl -F reference=@clip.mp4 -F prompt="a cat on a sofa" -F seed=3 http://127.0.0.1:8000/generate -o out.mp4

On a cluster use the RayService (python infra/render.py rayservice) or `serve run pipelines.serve:build_app
backbone=... checkpoint=...`; this script starts a local Ray instance (or joins --ray-address), prints one line
when the app is ready, and serves until interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.common import init_ray  # noqa: E402
from pipelines.config import ServeConfig, add_step_cost_args, step_cost_overrides  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    c = ServeConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="", help="diffusers pipeline dir of the frozen backbone (default: the bundled one)")
    p.add_argument("--checkpoint", default="", help="trained Video2LoRA artifact dir (default: the bundled one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=c.batch_size, help="most requests denoised together")
    p.add_argument("--batch-wait-timeout-s", type=float, default=c.batch_wait_timeout_s,
                   help="how long a batch waits for more requests once the first arrived")
    p.add_argument("--generator-replicas", type=int, default=c.generator_replicas)
    p.add_argument("--generator-max-replicas", type=int, default=c.generator_max_replicas,
                   help="above --generator-replicas: autoscale on queued requests")
    p.add_argument("--generator-num-gpus", type=float, default=c.generator_num_gpus)
    p.add_argument("--predictor-num-gpus", type=float, default=c.predictor_num_gpus)
    p.add_argument("--replica-num-cpus", type=float, default=c.replica_num_cpus)
    p.add_argument("--torch-threads", type=int, default=c.torch_threads)
    p.add_argument("--max-queued-requests", type=int, default=c.max_queued_requests, help="beyond this: 503")
    p.add_argument("--max-request-bytes", type=int, default=c.max_request_bytes)
    p.add_argument("--reference-uri-prefix", action="append", default=None,
                   help=f"a prefix reference_uri may start with (repeatable; default {list(c.reference_uri_prefixes)})")
    p.add_argument("--steps", type=int, default=None, help="default denoising steps of a request")
    add_step_cost_args(p)
    p.add_argument("--ray-address", default=None, help="default: a fresh local Ray instance")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> ServeConfig:
    from video2lora.config import GenerationConfig

    gen = dataclasses.replace(GenerationConfig(), **step_cost_overrides(a))
    if a.steps is not None:
        gen.steps = a.steps
    args = {k: getattr(a, k) for k in (
        "backbone", "checkpoint", "batch_size", "batch_wait_timeout_s", "generator_replicas", "generator_max_replicas",
        "generator_num_gpus", "predictor_num_gpus", "replica_num_cpus", "torch_threads", "max_queued_requests",
        "max_request_bytes")}
    if a.reference_uri_prefix:
        args["reference_uri_prefixes"] = tuple(a.reference_uri_prefix)
    return ServeConfig.from_args({**args, "generation": gen})


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    a = parse_args(argv)
    try:
        cfg = config_from_args(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ray import serve

    from pipelines.serve import build_app

    init_ray(a.ray_address, log_to_driver=True)
    serve.start(http_options={"host": a.host, "port": a.port})
    try:
        app = build_app(cfg)
    except ValueError as e:  # a bad step-cost setting
        print(f"error: {e}", file=sys.stderr)
        return 2
    serve.run(app, name="video2lora", route_prefix="/")
    print(f"ready: http://{a.host}:{a.port} (POST /generate, POST /lora, GET /healthz); Ctrl-C stops", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
