"""The four stages of batch generation (the driver is pipelines/batch.py).

fetch + decode references (CPU tasks) -> hypernetwork stage (actor pool, LoRAs in batches, identical references
encoded once) -> generation stage (actor pool, the DiT resident, one LoRA per row in one forward) -> encode + write
mp4 (CPU tasks). Every stage catches errors per row: a bad row ends as `failed` with its reason and the others go
on. Stages are pure (a batch run again gives the same rows) and every write is atomic, so a restarted actor or a
retried task never leaves a row half-written. Per-row settings arrive as typed columns (SETTING_COLUMNS), already
checked on the driver.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import OrderedDict

import numpy as np
import pandas as pd
import torch

from pipelines.common import error_text, frames_to_uint8, uint8_to_frames
from pipelines.config import BatchJobConfig
from pipelines.manifest import SETTING_COLUMNS, refined
from video2lora.predict import PredictedLoRA
from video2lora.storage import content_hash, join, read_bytes, safe_child, write_bytes_atomic

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ["sample_id", "status", "error", "output_uri", "lora_uri", "reference_hash", "lora_cache_hit",
                  "reference_fit", "t_fetch_s", "t_hypernet_s", "t_refine_s", "t_generate_s", "t_write_s", "gen_worker",
                  "row_fingerprint"]
# rows that share these settings are generated in one batch; the names are Video2LoRAGenerator.generate's arguments
GROUP_KEY = ("num_frames", "height", "width", "steps", "guidance_scale")
LORA_CACHE_SIZE = 4096  # predicted LoRAs kept per hypernetwork actor, by reference hash


def set_torch_threads(cfg: BatchJobConfig) -> int:
    """Apply cfg.torch_threads (0: keep the default) in an actor; returns the thread count in effect. Also keeps
    the actor's console to warnings and errors (they reach the driver's log): no weight-loading bars, no INFO."""
    quiet_worker()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    return torch.get_num_threads()


def quiet_worker() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_warning()
    transformers_logging.set_verbosity_warning()
    for name in ("pipelines", "video2lora"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _fail(row: dict, e: BaseException, **extra) -> None:
    row.update(status="failed", error=error_text(e), **extra)


# --- stage 1: fetch and decode (CPU tasks) ---

def mix_hash(hashes: list[str], weights: list[float]) -> str:
    """A row's reference_hash: its reference's content hash, or for a mix each hash with its weight."""
    if len(hashes) == 1 and weights == [1.0]:
        return hashes[0]
    return "+".join(f"{w:g}*{h}" for h, w in zip(hashes, weights))


def reference_pixels(data: bytes, uri: str, cfg: BatchJobConfig) -> bytes:
    """A reference clip's file -> its frames at the generation size, as the uint8 bytes the hypernetwork stage takes."""
    from video2lora.video_io import decode_video

    g = cfg.generation
    return frames_to_uint8(decode_video(data, uri, g.num_frames, g.height, g.width)).tobytes()


def fetch_and_decode(batch: pd.DataFrame, cfg: BatchJobConfig) -> pd.DataFrame:
    """Read each row's references (and first frame), or its LoRA file. Never raises for a bad row."""
    from video2lora.video_io import decode_image

    out = []
    for row in batch.to_dict("records"):
        start = time.perf_counter()
        uris, weights = list(row["reference_uris"]), [float(w) for w in row["reference_weights"]]
        rec = {"sample_id": row["sample_id"], "status": "pending", "error": "", "reference_hash": "",
               "ref_hashes": [], "ref_weights": weights, "ref_pixels": [], "image_pixels": b"", "lora_file": b"",
               "source_lora_uri": row["lora_uri"], "row_fingerprint": row.get("row_fingerprint", ""),
               **{c: row[c] for c in SETTING_COLUMNS}}
        try:
            if row["lora_uri"]:  # a LoRA file exported earlier: no hypernetwork for this row
                rec["lora_file"] = read_bytes(row["lora_uri"], max_bytes=cfg.max_reference_bytes)
                rec["reference_hash"] = content_hash(rec["lora_file"])
            for uri in uris:
                data = read_bytes(uri, max_bytes=cfg.max_reference_bytes)
                rec["ref_hashes"].append(content_hash(data))
                rec["ref_pixels"].append(reference_pixels(data, uri, cfg))
            if uris:
                rec["reference_hash"] = mix_hash(rec["ref_hashes"], weights)
            if row["image_uri"]:
                img = decode_image(read_bytes(row["image_uri"], max_bytes=cfg.max_reference_bytes),
                                   row["image_uri"], row["height"], row["width"])
                rec["image_pixels"] = frames_to_uint8(img).tobytes()
        except Exception as e:  # noqa: BLE001 - every failure of a row is recorded, never fatal
            _fail(rec, e, ref_pixels=[], lora_file=b"")
        rec["t_fetch_s"] = time.perf_counter() - start
        out.append(rec)
    return pd.DataFrame(out)


# --- stage 2: hypernetwork (actor pool) ---

class HypernetStage:
    """Keeps the VAE encoder and the hypernetwork resident; predicts LoRAs for a batch of references."""

    def __init__(self, backbone_uri: str, checkpoint_uri: str, cfg: BatchJobConfig):
        from video2lora.predict import LoRAPredictor

        start = time.perf_counter()
        set_torch_threads(cfg)
        self.predictor = LoRAPredictor.from_pretrained(backbone_uri, checkpoint_uri)  # no DiT, no text encoder
        self.cfg = cfg
        g = cfg.generation
        self.ref_shape = (3, g.num_frames, g.height, g.width)
        self.cache: OrderedDict[str, PredictedLoRA] = OrderedDict()  # reference content hash -> its LoRA
        logger.info("hypernetwork actor ready in %.1fs", time.perf_counter() - start)

    def _predict(self, rows: list[dict], refine: set[str]) -> tuple[set[str], dict]:
        """Predict the LoRAs of the references not cached yet, each distinct one once. Returns their hashes, and the
        latents of the references in `refine` (hashes), which the generation stage refines on: each reference is
        encoded once here, cached LoRA or not, and never again downstream."""
        todo, pixels = [], {}  # hashes to predict; hash -> reference pixels of every hash encoded
        for r in rows:
            if r["status"] == "pending":
                for h, px in zip(r["ref_hashes"], r["ref_pixels"]):
                    if h not in self.cache and h not in pixels:
                        todo.append(h)
                    if h not in pixels and (h not in self.cache or h in refine):
                        pixels[h] = px
        latents = {}
        if pixels:
            try:
                encoded = self.predictor.encode([uint8_to_frames(b, self.ref_shape) for b in pixels.values()],
                                                batch_size=self.cfg.hyper_batch_size)
                latents = dict(zip(pixels, encoded))
                self.cache.update(zip(todo, self.predictor.predict_from_latents(
                    [latents[h] for h in todo], batch_size=self.cfg.hyper_batch_size)))
            except Exception as e:  # noqa: BLE001
                for r in rows:
                    if set(r["ref_hashes"]) & set(pixels):
                        _fail(r, e)
        return set(todo), {h: latents[h] for h in refine if h in latents}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        start = time.perf_counter()
        rows = batch.to_dict("records")
        refining = self.cfg.generation.reads_reference_latents  # refining, or measuring each reference's fit
        for r in rows:  # list columns arrive as arrays
            r["ref_hashes"], r["ref_weights"] = list(r["ref_hashes"]), [float(w) for w in r["ref_weights"]]
            r["ref_pixels"] = list(r["ref_pixels"])
            # refining (or measuring the fit): the generation stage reads the reference (it holds the DiT)
            r["_refine"] = refining and r["status"] == "pending" and refined(
                r["ref_weights"], r["source_lora_uri"], r["lora_strength"])
        new, latents = self._predict(rows, {r["ref_hashes"][0] for r in rows if r["_refine"]})
        elapsed = (time.perf_counter() - start) / max(len(rows), 1)
        i2v = self.predictor.backbone.is_i2v
        for r in rows:
            pixels = r.pop("ref_pixels")
            lat = latents.get(r["ref_hashes"][0]) if r.pop("_refine") and r["status"] == "pending" else None
            # what refinement reads: the reference's latents (float32), and its first frame for an i2v backbone
            r["refine_latents"] = b"" if lat is None else lat.float().cpu().numpy().tobytes()
            r["refine_latent_shape"] = "" if lat is None else ",".join(map(str, lat.shape))
            r["refine_first_frame"] = (np.frombuffer(pixels[0], np.uint8).reshape(self.ref_shape)[:, 0].tobytes()
                                       if lat is not None and i2v else b"")
            pending = r["status"] == "pending" and bool(r["ref_hashes"])
            # a hit: every reference of the row was predicted before (an earlier batch, or an earlier row of this one)
            hit = pending and not any(h in new for h in r["ref_hashes"])
            for h in r["ref_hashes"]:
                new.discard(h)
            r.update(lora_a=b"", lora_b=b"", lora_uri="", t_hypernet_s=elapsed, lora_cache_hit=hit)
            if pending:
                lora = PredictedLoRA.blend([self.cache[h] for h in r["ref_hashes"]], r["ref_weights"])
                r["lora_a"], r["lora_b"] = lora.to_bytes()
            r.pop("ref_hashes", None), r.pop("ref_weights", None)
        while len(self.cache) > LORA_CACHE_SIZE:
            self.cache.popitem(last=False)
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
        self.generator.release_hypernetwork()  # LoRAs come predicted from the hypernetwork stage
        try:  # magcache calibrates here, not in a Serve replica's first request
            self.generator.warm_up()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at the default size: the rows calibrate as they come
            logger.warning("step-cache warm-up failed (%s); the first rows calibrate instead", error_text(e))
        self.cfg = cfg
        # (reference hash, caption) -> its refined LoRA, and its predicted LoRA's fit (None: not measured)
        self.refined_loras: OrderedDict[tuple, tuple[PredictedLoRA, float | None]] = OrderedDict()
        self.worker = (f"{ray.get_runtime_context().get_node_id()[:8]}:pid={os.getpid()}:gpus={ray.get_gpu_ids()}"
                       f":threads={threads}")
        logger.info("generation actor ready in %.1fs (%s)", time.perf_counter() - start, self.worker)

    def _lora(self, r):
        """The row's LoRA: predicted (bytes from the hypernetwork stage), or its LoRA file read back."""
        if r.get("lora_file"):
            return self.generator.lora_from_file(r["lora_file"], r.get("source_lora_uri") or "lora_uri")
        return self.generator.lora_from_bytes(r["lora_a"], r["lora_b"])

    def _refine(self, rows: list[dict]) -> None:
        """Refine the predicted LoRA of each row the hypernetwork stage passed a reference for (one reference at
        weight 1, strength not 0: `manifest.refined`; mixes were refused when planned), each distinct reference and
        caption once; the rows of a refinement that fails fail, the others go on. With refine_steps_unfamiliar set
        or measure_reference_fit, each reference's fit is measured first and recorded in `reference_fit`. A fit
        that fails fails its rows only where it picks their steps (refine_steps_unfamiliar); otherwise it is left
        empty with a warning, the rows go on, and the next batch measures it again."""
        g = self.cfg.generation
        rows = [r for r in rows if r["status"] == "pending" and r.get("refine_latents")]  # the rows it refines
        todo: dict[tuple, dict] = {}
        for r in rows:
            key = (r["reference_hash"], r["reference_prompt"])
            if key not in self.refined_loras:
                todo.setdefault(key, r)
        uncaptioned = sum(1 for _, caption in todo if not caption)
        if uncaptioned:  # measured: without the reference's caption the LoRA learns its content (README)
            logger.warning("%s %d reference(s) without a reference_prompt: %s; give each reference's caption",
                           "refining" if g.refine_steps else "measuring the fit of", uncaptioned,
                           "refinement then gains little and costs content fidelity" if g.refine_steps else
                           "the fit's threshold was measured with captions")
        made: dict[tuple, tuple] = {}  # this batch's (LoRA, fit) per key, cached or not
        for key, r in todo.items():
            start = time.perf_counter()
            try:
                shape = tuple(int(x) for x in r["refine_latent_shape"].split(","))
                latents = torch.from_numpy(np.frombuffer(r["refine_latents"], np.float32).reshape(shape).copy())
                frame = (uint8_to_frames(r["refine_first_frame"], (3, g.height, g.width))
                         if r.get("refine_first_frame") else None)
                args = [r["_lora"]], [latents], [frame], [r["reference_prompt"]]
                fit = None
                if g.measures_fit:
                    try:
                        fit = self.generator.reference_fits_from_latents(*args)[0]
                    except Exception as e:  # noqa: BLE001
                        if g.refine_steps_unfamiliar is not None:
                            raise  # the fit picks the steps: no refinement without it
                        logger.warning("reference %s: its fit could not be measured (%s); its rows are made "
                                       "without it", key[0][:12], error_text(e))
                lora = self.generator.refine_loras_from_latents(*args, fits=None if fit is None else [fit])[0]
                made[key] = lora, fit
                if fit is not None or not g.measures_fit:  # a fit that failed is measured again next batch
                    self.refined_loras[key] = made[key]
                r["t_refine_s"] = time.perf_counter() - start  # the row that paid for it; the others reuse it
            except Exception as e:  # noqa: BLE001
                for other in rows:
                    if (other["reference_hash"], other["reference_prompt"]) == key:
                        _fail(other, e)
        for r in rows:
            key = (r["reference_hash"], r["reference_prompt"])
            hit = made.get(key) or self.refined_loras.get(key)  # (LoRA, fit): a tuple, never empty
            if r["status"] == "pending" and hit:
                r["_lora"], r["reference_fit"] = hit
                if key in self.refined_loras:
                    self.refined_loras.move_to_end(key)
        while len(self.refined_loras) > LORA_CACHE_SIZE:
            self.refined_loras.popitem(last=False)

    def _request(self, r):
        from video2lora.generate import GenerationRequest

        image = uint8_to_frames(r["image_pixels"], (3, r["height"], r["width"])) if r["image_pixels"] else None
        return GenerationRequest(prompt=r["prompt"], lora=r["_lora"], image=image, negative_prompt=r["negative_prompt"],
                                 seed=r["seed"], lora_strength=r["lora_strength"])

    def _export(self, r) -> str:
        uri = safe_child(join(self.cfg.output, "loras"), f"{r['sample_id']}.safetensors")
        write_bytes_atomic(uri, self.generator.export_lora(r["_lora"], r["lora_strength"]))
        return uri

    def _generate(self, rows, key):
        return self.generator.generate([self._request(r) for r in rows], **dict(zip(GROUP_KEY, key)))

    def _run_group(self, group: list[dict], key: tuple) -> None:
        start = time.perf_counter()
        try:
            videos = self._generate(group, key)
        except Exception:  # noqa: BLE001 - isolate the row at fault, keep the others
            videos = []
            for r in group:
                try:
                    videos += self._generate([r], key)
                except Exception as e:  # noqa: BLE001
                    _fail(r, e)
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
                    _fail(r, e, video=b"")
            elif r.get("source_lora_uri"):  # a reused LoRA: the file it came from
                r["lora_uri"] = r["source_lora_uri"]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            r.update(video=b"", video_shape="", t_refine_s=0.0, t_generate_s=0.0, gen_worker=self.worker,
                     reference_fit=None)
            if r["status"] != "pending":
                continue
            try:
                self.generator.check_request(r["num_frames"], r["height"], r["width"], bool(r["image_pixels"]))
            except ValueError as e:
                _fail(r, e)
                continue
            try:
                r["_lora"] = self._lora(r)
            except Exception as e:  # noqa: BLE001 - a LoRA file whose keys or shapes do not fit: this row only
                _fail(r, ValueError(f"lora_uri: {error_text(e)}") if r.get("lora_file") else e)
                continue
        if self.cfg.generation.reads_reference_latents:
            self._refine([r for r in rows if "_lora" in r])
        for r in rows:
            if r["status"] == "pending" and "_lora" in r:
                groups.setdefault(tuple(r[k] for k in GROUP_KEY), []).append(r)
        for key, group in groups.items():
            self._run_group(group, key)
        for r in rows:
            for k in ("lora_a", "lora_b", "image_pixels", "lora_file", "_lora", "source_lora_uri", "refine_latents",
                      "refine_latent_shape", "refine_first_frame"):
                r.pop(k, None)
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
                _fail(r, e)
        r["t_write_s"] = time.perf_counter() - start
        rec = {c: r.get(c) for c in RESULT_COLUMNS}
        # values pandas made NaN (a reference_fit not measured) are written empty: rows/<id>.json stays strict JSON
        rec = {c: None if isinstance(v, float) and math.isnan(v) else v for c, v in rec.items()}
        if rec["status"] == "ok":  # a sidecar per finished row: results survive a killed driver
            write_bytes_atomic(safe_child(join(cfg.output, "rows"), f"{r['sample_id']}.json"), json.dumps(rec).encode())
        out.append(rec)
    return pd.DataFrame(out, columns=RESULT_COLUMNS)
