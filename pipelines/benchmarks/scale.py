"""Item 7: a resume at scale on a local S3 server (moto, 127.0.0.1 only): a manifest of N rows of which half were
finished earlier (in results.parquet, their videos present) and a few more only as row records (a killed
driver's). Measured: seconds and S3 requests the driver spends before it hands the first new row to Ray
(`pipelines.batch.plan_job`, then `planned_blocks`: the manifest read a batch of rows at a time), and the
driver's peak memory."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import resource
import socket
import threading
import time

from pipelines.benchmarks.context import Context, row

TARGETS = {"seconds": 60.0, "peak_gib": 2.0}
BUCKET = "v2l-scale"


class CountingMotoServer:
    """moto's S3 in a thread, counting the requests it answers."""

    def __init__(self):
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log(self, *args):  # one line per request would drown the benchmark's output
                pass

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = DomainDispatcherApplication(create_backend_app)
        self.requests = 0
        self._lock = threading.Lock()

        def counting(environ, start_response):
            with self._lock:
                self.requests += 1
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", port, counting, threaded=True, request_handler=Quiet)
        self.endpoint = f"http://127.0.0.1:{port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self):
        self._server.shutdown()


def put_objects(objects: dict[str, bytes]) -> None:
    """Straight into moto's in-memory backend (the server thread shares it): seeding 10^5 objects over HTTP
    would take longer than the measurement."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    for key, value in objects.items():
        backend.put_object(BUCKET, key, value)


def seed(rows: int, finished: int, killed: int, cfg) -> tuple[str, str]:
    """The manifest and an output prefix with `finished` rows in results.parquet and `killed` more as row records,
    each with the fingerprint the job (`cfg`) gives its manifest row, as a real resume finds them."""
    import boto3
    import pandas as pd

    from pipelines.batch import plan_row, write_results
    from pipelines.fingerprint import job_signature
    from pipelines.manifest import open_manifest
    from pipelines.stages import RESULT_COLUMNS

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    out = f"s3://{BUCKET}/run"
    ids = [f"row{i:06d}" for i in range(rows)]
    manifest = pd.DataFrame({"sample_id": ids, "reference_uri": [f"refs/ref{i % 97}.mp4" for i in range(rows)],
                             "prompt": ["a red circle on a black background"] * rows, "seed": range(rows)})
    buf = io.BytesIO()
    manifest.to_parquet(buf, index=False)
    put_objects({"manifest.parquet": buf.getvalue()})
    cfg = dataclasses.replace(cfg, output=out)
    defaults, job, made = dataclasses.asdict(cfg.generation), job_signature(cfg), set(ids[: finished + killed])
    manifest = open_manifest(f"s3://{BUCKET}/manifest.parquet")
    fingerprints = {r["sample_id"]: plan_row(r, defaults, job, out, manifest.base)["row_fingerprint"]
                    for batch in manifest.batches() for r in batch if r["sample_id"] in made}
    done = {sid: {c: None for c in RESULT_COLUMNS} | {"sample_id": sid, "status": "ok", "row_fingerprint": fingerprints[sid],
                                                     "output_uri": f"{out}/videos/{sid}.mp4"}
            for sid in ids[: finished + killed]}
    objects = {}
    objects |= {f"run/videos/{sid}.mp4": b"mp4" for sid in done}
    objects |= {f"run/rows/{sid}.json": json.dumps(done[sid]).encode() for sid in ids[: finished + killed]}
    put_objects(objects)
    write_results(out, {sid: done[sid] for sid in ids[:finished]})  # the killed driver's last rows: records only
    return f"s3://{BUCKET}/manifest.parquet", out


def bench_scale(ctx: Context) -> dict:
    from pipelines.batch import plan_job, planned_blocks
    from pipelines.config import BatchJobConfig
    from video2lora.config import GenerationConfig

    a = ctx.args
    rows = 2_000 if a.quick else 100_000
    finished, killed = rows // 2, rows // 100
    server = CountingMotoServer()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()
        cfg = BatchJobConfig(generation=GenerationConfig(num_frames=9, height=32, width=32))
        manifest, out = seed(rows, finished, killed, cfg)
        cfg = dataclasses.replace(cfg, output=out)
        before = server.requests
        start = time.perf_counter()
        plan, settled = plan_job(manifest, cfg)
        skipped = len(settled)
        todo = sum(len(block) for block in planned_blocks(plan, settled, cfg))  # the job ray.puts each block
        seconds = time.perf_counter() - start
        requests = server.requests - before
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB: the whole benchmark process
    assert len(plan.ids) == rows and skipped == finished + killed and todo == rows - skipped, (skipped, todo)
    name = f"resume of {rows:,} rows ({finished:,} in results.parquet, {killed:,} as row records), local S3"
    return {"table": [
        row(7, f"{name}: driver seconds until the first new row is handed to Ray", seconds, "s", TARGETS["seconds"],
            seconds < TARGETS["seconds"]),
        row(7, "S3 requests of that resume (listing pages + one batch of row records + manifest + table)", requests, ""),
        row(7, "benchmark process peak RSS (includes torch and the other items)", peak_gib, "GiB", TARGETS["peak_gib"],
            peak_gib < TARGETS["peak_gib"]),
    ], "details": {"rows": rows, "finished": finished, "killed": killed, "seconds": seconds, "requests": requests,
                   "to_do": todo, "peak_rss_gib": peak_gib}}
