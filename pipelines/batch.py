"""Batch generation on Ray Data: manifest rows in, one mp4 per row out, resumable.

read manifest -> fetch + decode references (CPU tasks) -> hypernetwork stage (actor pool, LoRAs in batches,
identical references encoded once) -> generation stage (actor pool, the DiT resident, one LoRA per row in one
forward) -> encode + write mp4 (CPU tasks) -> results. Every stage catches errors per row: a bad row ends as
`failed` with its reason and the others go on. Ray Data streams, so the hypernetwork runs ahead of generation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import OrderedDict

import numpy as np
import pandas as pd
import torch

from pipelines.common import SetupError, error_text, frames_to_uint8, init_ray, uint8_to_frames
from pipelines.config import BatchJobConfig
from video2lora.storage import (
    content_hash, exists, join, read_bytes, redact, remove_partial_writes, safe_child, write_bytes_atomic,
)

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.parquet"
RESULT_COLUMNS = ["sample_id", "status", "error", "output_uri", "lora_uri", "reference_hash", "lora_cache_hit",
                  "t_fetch_s", "t_hypernet_s", "t_generate_s", "t_write_s", "gen_worker"]


# --- stage 1: fetch and decode (CPU tasks) ---

def fetch_and_decode(batch: pd.DataFrame, cfg: BatchJobConfig) -> pd.DataFrame:
    """Read each row's reference (and first frame). Never raises for a bad row."""
    from video2lora.video_io import decode_image, decode_video

    g = cfg.generation
    out = []
    for row in batch.to_dict("records"):
        start = time.perf_counter()
        rec = {"sample_id": row["sample_id"], "status": "pending", "error": "", "reference_hash": "",
               "ref_pixels": b"", "image_pixels": b"", "settings": row["settings"]}
        try:
            settings = json.loads(row["settings"])
            data = read_bytes(row["reference_uri"], max_bytes=cfg.max_reference_bytes)
            rec["reference_hash"] = content_hash(data)
            ref = decode_video(data, row["reference_uri"], g.num_frames, g.height, g.width)
            rec["ref_pixels"] = frames_to_uint8(ref).tobytes()
            if row["image_uri"]:
                img = decode_image(read_bytes(row["image_uri"], max_bytes=cfg.max_reference_bytes),
                                   row["image_uri"], settings["height"], settings["width"])
                rec["image_pixels"] = frames_to_uint8(img).tobytes()
        except Exception as e:  # noqa: BLE001 - every failure of a row is recorded, never fatal
            rec.update(status="failed", error=error_text(e), ref_pixels=b"")
        rec["t_fetch_s"] = time.perf_counter() - start
        out.append(rec)
    return pd.DataFrame(out)


def set_torch_threads(cfg: BatchJobConfig) -> int:
    """Apply cfg.torch_threads (0: keep the default) in an actor; returns the thread count in effect."""
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    return torch.get_num_threads()


# --- stage 2: hypernetwork (actor pool) ---

class HypernetStage:
    """Keeps the VAE encoder and the hypernetwork resident; predicts LoRAs for a batch of references."""

    def __init__(self, backbone_uri: str, checkpoint_uri: str, cfg: BatchJobConfig):
        from video2lora.generate import Video2LoRAGenerator

        start = time.perf_counter()
        set_torch_threads(cfg)
        self.generator = Video2LoRAGenerator.from_pretrained(backbone_uri, checkpoint_uri)
        self.cfg = cfg
        g = cfg.generation
        self.ref_shape = (3, g.num_frames, g.height, g.width)
        self.cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()  # reference hash -> LoRA
        logger.info("hypernetwork actor ready in %.1fs", time.perf_counter() - start)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        start = time.perf_counter()
        rows = batch.to_dict("records")
        todo, first = {}, {}  # hash -> reference pixels, each distinct reference once; hash -> its first row
        for i, r in enumerate(rows):
            if r["status"] == "pending" and r["reference_hash"] not in self.cache and r["reference_hash"] not in todo:
                todo[r["reference_hash"]], first[r["reference_hash"]] = r["ref_pixels"], i
        if todo:
            try:
                refs = [uint8_to_frames(b, self.ref_shape) for b in todo.values()]
                loras = self.generator.predict_loras(refs, batch_size=self.cfg.hyper_batch_size)
                for h, lora in zip(todo, loras):
                    self.cache[h] = (lora.a_pred.numpy(), lora.b_pred.numpy())
            except Exception as e:  # noqa: BLE001
                for r in rows:
                    if r["reference_hash"] in todo:
                        r.update(status="failed", error=error_text(e))
        while len(self.cache) > 4096:
            self.cache.popitem(last=False)
        elapsed = (time.perf_counter() - start) / max(len(rows), 1)
        for i, r in enumerate(rows):
            r.pop("ref_pixels", None)
            r["lora_a"] = r["lora_b"] = b""
            r["lora_cache_hit"] = r["status"] == "pending" and first.get(r["reference_hash"]) != i
            r["lora_uri"] = ""
            r["t_hypernet_s"] = elapsed
            if r["status"] != "pending":
                continue
            a, b = self.cache[r["reference_hash"]]
            r["lora_a"], r["lora_b"] = a.tobytes(), b.tobytes()
        return pd.DataFrame(rows)


# --- stage 3: generation (actor pool, one GPU each on a GPU cluster) ---

class GenerateStage:
    """Keeps text encoder, DiT and VAE decoder resident; denoises rows with different LoRAs in one batch."""

    def __init__(self, backbone_uri: str, checkpoint_uri: str, cfg: BatchJobConfig):
        import ray

        from video2lora.generate import Video2LoRAGenerator

        start = time.perf_counter()
        threads = set_torch_threads(cfg)
        self.generator = Video2LoRAGenerator.from_pretrained(backbone_uri, checkpoint_uri, cfg.generation)
        self.cfg = cfg
        lc = self.generator.model.config.lora
        self.a_shape = (len(self.generator.layer_names), lc.rank, lc.down)
        self.b_shape = (len(self.generator.layer_names), lc.up, lc.rank)
        self.worker = (f"{ray.get_runtime_context().get_node_id()[:8]}:pid={os.getpid()}:gpus={ray.get_gpu_ids()}"
                       f":threads={threads}")
        logger.info("generation actor ready in %.1fs (%s)", time.perf_counter() - start, self.worker)

    def _request(self, r):
        from video2lora.generate import GenerationRequest, PredictedLoRA

        s = json.loads(r["settings"])
        image = None
        if r["image_pixels"]:
            image = uint8_to_frames(r["image_pixels"], (3, s["height"], s["width"]))
        lora = PredictedLoRA(torch.from_numpy(np.frombuffer(r["lora_a"], np.float32).reshape(self.a_shape).copy()),
                             torch.from_numpy(np.frombuffer(r["lora_b"], np.float32).reshape(self.b_shape).copy()))
        return GenerationRequest(prompt=s["prompt"], lora=lora, image=image, negative_prompt=s["negative_prompt"],
                                 seed=s["seed"], lora_strength=s["lora_strength"])

    def _export(self, r) -> str:
        from video2lora.export import export_lora_bytes

        lora = self._request(r).lora
        uri = safe_child(join(self.cfg.output, "loras"), f"{r['sample_id']}.safetensors")
        strength = json.loads(r["settings"])["lora_strength"]
        write_bytes_atomic(uri, export_lora_bytes(self.generator.model, lora.a_pred, lora.b_pred, strength))
        return uri

    def _generate(self, rows, key):
        num_frames, height, width, steps, guidance = key
        requests = [self._request(r) for r in rows]
        return self.generator.generate(requests, num_frames=num_frames, height=height, width=width,
                                       steps=steps, guidance_scale=guidance)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            r.update(video=b"", video_shape="", t_generate_s=0.0, gen_worker=self.worker)
            if r["status"] != "pending":
                continue
            s = json.loads(r["settings"])
            try:
                self.generator.backbone.check_size(s["num_frames"], s["height"], s["width"])
                if self.generator.backbone.is_i2v and not r["image_pixels"]:
                    raise ValueError("the image-to-video backbone needs image_uri (a first frame) for this row")
            except ValueError as e:
                r.update(status="failed", error=error_text(e))
                continue
            key = (s["num_frames"], s["height"], s["width"], s["steps"], s["guidance_scale"])
            groups.setdefault(key, []).append(r)
        for key, group in groups.items():
            start = time.perf_counter()
            try:
                videos = self._generate(group, key)
            except Exception:  # noqa: BLE001 - isolate the row at fault, keep the others
                videos = []
                for r in group:
                    try:
                        videos += self._generate([r], key)
                    except Exception as e:  # noqa: BLE001
                        r.update(status="failed", error=error_text(e))
                        videos.append(None)
            per_row = (time.perf_counter() - start) / len(group)
            for r, v in zip(group, videos):
                r["t_generate_s"] = per_row
                if v is None:
                    continue
                r["video"] = frames_to_uint8(v).tobytes()
                r["video_shape"] = ",".join(map(str, v.shape))
                if self.cfg.export_loras:  # only rows that made a video get a LoRA file
                    try:
                        r["lora_uri"] = self._export(r)
                    except Exception as e:  # noqa: BLE001
                        r.update(status="failed", error=error_text(e), video=b"")
        for r in rows:
            r.pop("lora_a", None), r.pop("lora_b", None), r.pop("image_pixels", None)
        return pd.DataFrame(rows)


# --- stage 4: encode and write (CPU tasks) ---

def write_videos(batch: pd.DataFrame, cfg: BatchJobConfig) -> pd.DataFrame:
    from video2lora.video_io import encode_video

    out = []
    for r in batch.to_dict("records"):
        start = time.perf_counter()
        r["output_uri"] = ""
        if r["status"] == "pending":
            try:
                shape = tuple(int(x) for x in r["video_shape"].split(","))
                frames = uint8_to_frames(r["video"], shape)
                uri = safe_child(join(cfg.output, "videos"), f"{r['sample_id']}.mp4")
                write_bytes_atomic(uri, encode_video(frames, fps=cfg.generation.fps))
                r.update(status="ok", output_uri=uri)
            except Exception as e:  # noqa: BLE001
                r.update(status="failed", error=error_text(e))
        r["t_write_s"] = time.perf_counter() - start
        rec = {c: r.get(c) for c in RESULT_COLUMNS}
        if rec["status"] == "ok":  # a sidecar per finished row: results survive a killed driver
            write_bytes_atomic(safe_child(join(cfg.output, "rows"), f"{r['sample_id']}.json"), json.dumps(rec).encode())
        out.append(rec)
    return pd.DataFrame(out, columns=RESULT_COLUMNS)


# --- the driver ---

def load_previous_results(output: str) -> dict[str, dict]:
    """Rows finished by earlier runs: the results table plus per-row sidecars written after it."""
    from video2lora.storage import list_files

    done: dict[str, dict] = {}
    uri = join(output, RESULTS_NAME)
    if exists(uri):
        import io

        table = pd.read_parquet(io.BytesIO(read_bytes(uri)))
        for rec in table.to_dict("records"):
            done[rec["sample_id"]] = rec
    for f in list_files(join(output, "rows"), suffix=".json"):
        try:
            rec = json.loads(read_bytes(f))
        except (ValueError, OSError) as e:
            logger.warning("ignoring unreadable row record %s: %s", redact(f), e)
            continue
        done.setdefault(rec["sample_id"], rec)
        if done[rec["sample_id"]].get("status") != "ok":
            done[rec["sample_id"]] = rec
    return done


def write_results(output: str, results: dict[str, dict]) -> str:
    import io

    df = pd.DataFrame(list(results.values()), columns=RESULT_COLUMNS)
    for c in ("t_fetch_s", "t_hypernet_s", "t_generate_s", "t_write_s"):
        df[c] = df[c].astype("float64")
    df["lora_cache_hit"] = df["lora_cache_hit"].astype("boolean")
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    uri = join(output, RESULTS_NAME)
    write_bytes_atomic(uri, buf.getvalue())
    return uri


def failure_limit(max_failures: float, total: int) -> int | None:
    if max_failures is None or max_failures < 0:
        return None
    if 0 < max_failures < 1:
        return int(max_failures * total)
    return int(max_failures)


class TooManyFailures(RuntimeError):
    pass


def check_artifacts(cfg: BatchJobConfig) -> None:
    """Load the checkpoint once on the driver (safetensors and config only: a pickle is refused, never unpickled)
    and check that the backbone is a pipeline directory, so a bad --checkpoint or --backbone fails at once with
    one clear message rather than in every actor."""
    from video2lora.hypernet import Video2LoRAModel

    if not cfg.checkpoint:
        raise SetupError("no --checkpoint given")
    if not exists(join(cfg.backbone, "model_index.json")):
        raise SetupError(f"--backbone {redact(cfg.backbone)} is not a diffusers pipeline directory (no model_index.json)")
    try:
        Video2LoRAModel.from_pretrained(cfg.checkpoint)
    except Exception as e:  # noqa: BLE001 - whatever the reason, the job cannot start
        raise SetupError(f"--checkpoint {redact(cfg.checkpoint)} cannot be used: {error_text(e)}") from None


def _remove_partial_writes(output: str) -> None:
    """Temporary files of writes cut short by a killed worker or driver (local output); none is in flight now."""
    for d in (output, join(output, "videos"), join(output, "rows"), join(output, "loras")):
        for path in remove_partial_writes(d):
            logger.warning("removed %s, left by an interrupted write", redact(path))


def run_batch_job(manifest_uri: str, cfg: BatchJobConfig, progress: bool = True) -> dict:
    """Run (or resume) the batch job. Returns a summary; raises TooManyFailures past --max-failures,
    after writing the results of every finished row."""
    import ray
    from ray.data import ActorPoolStrategy
    from tqdm import tqdm

    from pipelines.manifest import read_manifest, resolve_uris, row_settings
    start = time.perf_counter()
    rows = resolve_uris(read_manifest(manifest_uri), manifest_uri)
    previous = load_previous_results(cfg.output)
    results: dict[str, dict] = {}
    todo = []
    for row in rows:
        sid = row["sample_id"]
        prev = previous.get(sid)
        if prev and prev.get("status") in ("ok", "skipped") and prev.get("output_uri") and exists(prev["output_uri"]):
            results[sid] = {**prev, "status": "skipped", "error": "done in an earlier run"}
            continue
        try:  # rows are checked here, on the driver; the stages then only see plain strings
            for name in (sid, f"{sid}.mp4", f"{sid}.json", f"{sid}.safetensors"):  # the id and every file it names
                safe_child(cfg.output, name)
            settings = row_settings(row, dataclasses.asdict(cfg.generation))
        except ValueError as e:
            results[sid] = {c: None for c in RESULT_COLUMNS} | {"sample_id": sid, "status": "failed", "error": error_text(e)}
            continue
        todo.append({"sample_id": sid, "reference_uri": row["reference_uri"], "image_uri": row.get("image_uri") or "",
                     "settings": json.dumps(settings)})
    limit = failure_limit(cfg.max_failures, len(rows))
    failed = sum(r["status"] == "failed" for r in results.values())
    logger.info("%d rows: %d to do, %d done earlier", len(rows), len(todo), len(rows) - len(todo) - failed)
    if todo:
        check_artifacts(cfg)
    _remove_partial_writes(cfg.output)

    init_ray(log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False

    last_flush = time.perf_counter()
    stopped = None
    if todo:
        df = pd.DataFrame(todo)
        # blocks of one generation batch each, cut here on the driver: a repartition would run as tasks of 1 CPU,
        # which never get scheduled once the actors hold more than all CPUs but one (e.g. 2 generation actors +
        # the hypernetwork actor at 0.5 CPU each on 2 CPUs), and the job would hang
        step = max(cfg.batch_size, 1)
        ds = ray.data.from_pandas([df.iloc[i: i + step] for i in range(0, len(df), step)])
        ds = ds.map_batches(fetch_and_decode, batch_format="pandas", batch_size=cfg.batch_size,
                            num_cpus=cfg.decode_num_cpus, fn_kwargs={"cfg": cfg})
        # A dead actor (killed, node lost) is restarted and the batches it held are run again: stages are pure
        # and every write is atomic, so a row is never half-written nor reported twice.
        retry = {"max_restarts": -1, "max_task_retries": -1}
        # the hypernetwork's output blocks are what the generation actors are handed, whole: blocks of more than
        # one generation batch would leave actors idle (3 blocks of 8 rows over 2 actors: one does 16 rows, the
        # other 8) and hold each row back until its whole block is generated
        ds = ds.map_batches(HypernetStage, batch_format="pandas", batch_size=min(cfg.hyper_batch_size, cfg.batch_size),
                            compute=ActorPoolStrategy(size=cfg.num_hyper_actors),
                            num_gpus=cfg.hyper_num_gpus, num_cpus=cfg.actor_num_cpus, **retry,
                            fn_constructor_kwargs={"backbone_uri": cfg.backbone, "checkpoint_uri": cfg.checkpoint,
                                                   "cfg": cfg})
        ds = ds.map_batches(GenerateStage, batch_format="pandas", batch_size=cfg.batch_size,
                            compute=ActorPoolStrategy(size=cfg.num_gen_actors),
                            num_gpus=cfg.gen_num_gpus, num_cpus=cfg.actor_num_cpus, **retry,
                            fn_constructor_kwargs={"backbone_uri": cfg.backbone, "checkpoint_uri": cfg.checkpoint, "cfg": cfg})
        ds = ds.map_batches(write_videos, batch_format="pandas", batch_size=cfg.batch_size,
                            num_cpus=cfg.decode_num_cpus, fn_kwargs={"cfg": cfg})
        bar = tqdm(total=len(todo), desc="videos", unit="row", disable=not progress, dynamic_ncols=True)
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            for rec in batch.to_dict("records"):
                results[rec["sample_id"]] = rec
                failed += rec["status"] == "failed"
                if rec["status"] == "failed":
                    logger.warning("row %s failed: %s", rec["sample_id"], rec["error"])
            bar.update(len(batch))
            bar.set_postfix(failed=failed)
            if time.perf_counter() - last_flush > cfg.results_flush_seconds:
                write_results(cfg.output, results)
                last_flush = time.perf_counter()
            if limit is not None and failed > limit:
                stopped = f"stopped: {failed} failed rows exceed --max-failures {cfg.max_failures}"
                break
        bar.close()
        if not stopped:  # every write has ended: clear what a killed actor left, e.g. a LoRA file cut short
            _remove_partial_writes(cfg.output)
    for row in rows:
        results.setdefault(row["sample_id"], {c: None for c in RESULT_COLUMNS} | {
            "sample_id": row["sample_id"], "status": "skipped", "error": stopped or "not run"})
    uri = write_results(cfg.output, results)
    wall = time.perf_counter() - start
    counts = pd.Series([r["status"] for r in results.values()]).value_counts().to_dict()
    made = counts.get("ok", 0)
    gen_busy = sum(float(r.get("t_generate_s") or 0) for r in results.values() if r["status"] == "ok")
    summary = {
        "rows": len(rows), "ok": made, "failed": counts.get("failed", 0), "skipped": counts.get("skipped", 0),
        "wall_s": wall, "rows_per_s": made / wall if wall else 0.0,
        "generation_busy_fraction": gen_busy / (wall * max(cfg.num_gen_actors, 1)),
        "results_uri": uri, "videos_uri": join(cfg.output, "videos"),
    }
    if stopped:
        raise TooManyFailures(f"{stopped}; results of finished rows are in {redact(uri)}")
    return summary


def apply_backbone_defaults(cfg: BatchJobConfig, explicit: set[str] = frozenset()) -> BatchJobConfig:
    """Take the generation settings a backbone dir carries (generation_defaults.json, e.g. the tiny models'
    size) for every field the user did not set explicitly."""
    from video2lora.presets import DEFAULTS_NAME

    uri = join(cfg.backbone, DEFAULTS_NAME)
    values = json.loads(read_bytes(uri)) if exists(uri) else {}
    for k, v in values.items():
        if k not in explicit and hasattr(cfg.generation, k):
            setattr(cfg.generation, k, v)
    return cfg
