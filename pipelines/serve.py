"""Online requests on Ray Serve: one video (or one LoRA) per HTTP request, from the batch job's models and stages.

    serve run pipelines.serve:app                                   # the embedded default, http://127.0.0.1:8000
    serve run pipelines.serve:build_app backbone=s3://... checkpoint=s3://... generator_num_gpus=1
    python jobs/serve.py                                            # the same, started locally, one line when ready

Three deployments (the two model ones in pipelines/serve_models.py). The ingress parses and checks a request (the batch job's per-row checks), reads the reference,
and answers. The LoRA predictor (VAE encoder + hypernetwork, the batch job's HypernetStage: a LoRA cache by
reference content hash that every request to a replica shares) predicts each distinct reference once. The
generator (text encoder + DiT + VAE, the batch job's GenerateStage) gathers concurrent requests with
`@serve.batch` and denoises them in one batch, each row with its own LoRA.

HTTP: `POST /generate` (multipart form) -> the mp4; `POST /lora` -> the reference's LoRA as a diffusers/PEFT
safetensors file; `GET /healthz`. A bad request gets a 4xx with a JSON body {"error", "field"}; a full queue a
503; a generator replica lost mid-request is retried once on another (the video is the same: generation is
seeded), then answered with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time

from ray import serve

from pipelines.common import error_text, frames_to_uint8, uint8_to_frames
from pipelines.manifest import MAX_REFERENCES
from pipelines.config import ServeConfig
from pipelines.serve_models import Generator, LoRAPredictor
from video2lora.config import InputError
from video2lora.storage import content_hash

logger = logging.getLogger(__name__)

# form fields of POST /generate and their types; the reference is `reference` (a file) or `reference_uri`
INT_FIELDS = ("seed", "num_frames", "height", "width", "steps")
FLOAT_FIELDS = ("guidance_scale", "lora_strength")
TEXT_FIELDS = ("prompt", "negative_prompt", "reference_uri", "reference_weights")
FILE_FIELDS = ("reference", "image", "lora")  # `reference` may repeat: a mix, weighed by reference_weights
GENERATE_FIELDS = set(INT_FIELDS + FLOAT_FIELDS + TEXT_FIELDS + FILE_FIELDS)
LORA_FIELDS = {"reference", "reference_uri", "reference_weights", "lora_strength"}
REPLICA_LOST = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ReplicaUnavailableError",
                "DeploymentUnavailableError", "WorkerCrashedError")


class RequestError(Exception):
    """A request refused: HTTP status, the field at fault, the reason."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field = status, field


def uri_allowed(uri: str, prefixes: tuple[str, ...]) -> bool:
    """Whether reference_uri names a file under one of the allowed prefixes: a '..' part is refused outright (it
    would climb out of a prefix: `<dir>/../../etc/passwd` starts with `<dir>`), and a local path must still be under
    a local prefix once symlinks are resolved."""
    if ".." in uri.replace("\\", "/").split("/") or "\x00" in uri:
        return False
    for prefix in prefixes:
        if "://" in prefix:
            if uri.startswith(prefix):
                return True
        elif "://" not in uri:
            root = os.path.realpath(prefix)
            if os.path.commonpath([root, os.path.realpath(uri)]) == root:
                return True
    return False


# --- the ingress: HTTP in, checks, answers ---

def _json(status: int, body: dict, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


async def read_form(request, limit: int):
    """The multipart form of `request`, refused (413) once the body passes `limit` bytes: from Content-Length
    before any byte is read, else while it streams in."""
    from starlette.requests import Request

    kind = request.headers.get("content-type", "")
    if "multipart/form-data" not in kind and "application/x-www-form-urlencoded" not in kind:
        raise RequestError(415, "content-type", "send a multipart/form-data body (curl -F reference=@clip.mp4 ...)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "reference", f"the upload is {int(declared):,} bytes, more than {limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, "reference", f"the upload is more than {limit:,} bytes")
    sent = False

    async def receive():  # the body again, for Starlette's multipart parser
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=len(FILE_FIELDS) + MAX_REFERENCES, max_fields=32)
    except Exception as e:  # noqa: BLE001 - a malformed body
        raise RequestError(400, "body", f"cannot parse the multipart form: {e}") from None
    fields = {}
    for key, value in form.multi_items():
        if key == "reference":  # a list: one file, or several for a mix
            fields.setdefault(key, []).append(value)
        elif key in fields:
            raise RequestError(422, key, f"{key} is given more than once")
        else:
            fields[key] = value
    return fields


def _number(fields: dict, name: str, kind):
    value = fields.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RequestError(422, name, f"{name} must be a form field, not a file")
    try:
        number = float(value)
    except ValueError:
        raise RequestError(422, name, f"{name}={value[:50]!r} is not a number") from None
    if kind is int:
        if not math.isfinite(number) or not number.is_integer():
            raise RequestError(422, name, f"{name}={value[:50]!r} is not a whole number")
        return int(number)
    return number


@serve.deployment
class Video2LoRAApp:
    """The HTTP ingress: checks requests, asks the predictor for LoRAs and the generator for videos."""

    def __init__(self, cfg: ServeConfig, predictor, generator):
        self.cfg, self.predictor, self.generator = cfg, predictor, generator

    async def __call__(self, request):
        # relative to the app's route_prefix (Serve puts it in root_path), so the app answers under any prefix
        path, root = request.url.path, request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        path, method = path.rstrip("/") or "/", request.method
        routes = {"/generate": ("POST", self.generate), "/lora": ("POST", self.lora), "/healthz": ("GET", self.healthz)}
        if path not in routes:
            return _json(404, {"error": f"no route {path}; use POST /generate, POST /lora or GET /healthz", "field": ""})
        want, handler = routes[path]
        if method != want:
            return _json(405, {"error": f"{path} takes {want}", "field": ""}, {"Allow": want})
        try:
            return await asyncio.wait_for(handler(request), self.cfg.request_timeout_s)
        except RequestError as e:
            headers = {"Retry-After": "1"} if e.status == 503 else None
            return _json(e.status, {"error": str(e), "field": e.field}, headers)
        except asyncio.TimeoutError:
            return _json(504, {"error": f"not answered within {self.cfg.request_timeout_s:g} s", "field": ""})

    async def healthz(self, request):
        try:
            await asyncio.wait_for(asyncio.gather(self.predictor.ping.remote(), self.generator.ping.remote()), 10)
        except Exception as e:  # noqa: BLE001
            return _json(503, {"status": "unavailable", "error": error_text(e)})
        return _json(200, {"status": "ok"})

    # -- request parts

    async def _references(self, fields: dict) -> list[tuple[str, bytes]]:
        """(content hash, file bytes) of each reference: uploaded files, or the one reference_uri."""
        uploads, uri = fields.get("reference") or [], fields.get("reference_uri")
        if uploads and uri:
            raise RequestError(422, "reference", "give reference (files) or reference_uri, not both")
        if not uploads and not uri:
            raise RequestError(422, "reference", "reference (a file) or reference_uri is required")
        if len(uploads) > MAX_REFERENCES:
            raise RequestError(422, "reference", f"{len(uploads)} references; a mix takes at most {MAX_REFERENCES}")
        datas = []
        for upload in uploads:
            if isinstance(upload, str):
                raise RequestError(422, "reference", "reference must be a file upload (use reference_uri for a URI)")
            datas.append(await upload.read())
        if uri:
            if not isinstance(uri, str):
                raise RequestError(422, "reference_uri", "reference_uri must be a form field, not a file")
            if not uri_allowed(uri, self.cfg.reference_uri_prefixes):
                raise RequestError(422, "reference_uri", f"reference_uri must start with one of "
                                                         f"{list(self.cfg.reference_uri_prefixes)} (no '..' parts)")
            from video2lora.storage import read_bytes

            try:
                datas.append(await asyncio.to_thread(read_bytes, uri, self.cfg.max_request_bytes))
            except Exception as e:  # noqa: BLE001 - missing, unreadable, too large
                raise RequestError(422, "reference_uri", error_text(e)) from None
        if not all(datas):
            raise RequestError(422, "reference", "a reference is empty")
        return [(content_hash(d), d) for d in datas]

    async def _lora(self, fields: dict) -> dict:
        """The request's LoRA: its references' predicted LoRAs with their weights (the generator blends them), or
        an uploaded LoRA file (`lora`, as POST /lora or the batch job's --export-loras write it)."""
        from pipelines.manifest import row_sources
        from pipelines.stages import mix_hash

        upload = fields.get("lora")
        if upload is not None:
            if fields.get("reference") or fields.get("reference_uri") or fields.get("reference_weights"):
                raise RequestError(422, "lora", "give lora (a LoRA file) or references, not both")
            if isinstance(upload, str):
                raise RequestError(422, "lora", "lora must be a file upload")
            data = await upload.read()
            return {"loras": [], "weights": [], "lora_file": data, "reference_hash": content_hash(data),
                    "cache_hit": False, "t_s": 0.0}
        refs = await self._references(fields)
        weights = fields.get("reference_weights")
        if weights is not None:
            if not isinstance(weights, str):
                raise RequestError(422, "reference_weights", "reference_weights must be a form field, e.g. 0.7,0.3")
            try:
                weights = [float(w) for w in weights.split(",")]
            except ValueError:
                raise RequestError(422, "reference_weights", f"reference_weights={weights[:50]!r}: give numbers "
                                                             "separated by commas") from None
        try:
            weights = row_sources({"reference_uris": ["upload"] * len(refs), "reference_weights": weights})[
                "reference_weights"]
        except InputError as e:
            raise RequestError(422, "reference" if e.field == "reference_uris" else e.field, str(e)) from None
        predicted = await asyncio.gather(*(self._call(self.predictor.predict, ref) for ref in refs))
        for p in predicted:
            if "error" in p:
                raise RequestError(422, p["field"], p["error"])
        return {"loras": [(p["lora_a"], p["lora_b"]) for p in predicted], "weights": weights, "lora_file": b"",
                "reference_hash": mix_hash([h for h, _ in refs], weights),
                "cache_hit": all(p["cache_hit"] for p in predicted), "t_s": max(p["t_s"] for p in predicted)}

    async def _call(self, method, *args):
        """One call to a model deployment: a full queue is a 503; a replica lost mid-call is retried once."""
        from ray.serve.exceptions import BackPressureError

        for attempt in (0, 1):
            try:
                return await method.remote(*args)
            except BackPressureError:
                raise RequestError(503, "", "the service is at capacity (queue full); retry later") from None
            except Exception as e:  # noqa: BLE001
                lost = type(e).__name__ in REPLICA_LOST or any(n in str(type(e).__mro__) for n in REPLICA_LOST)
                if not lost:
                    raise
                logger.warning("a model replica was lost mid-request (%s); %s", type(e).__name__,
                               "retrying" if attempt == 0 else "giving up")
                if attempt == 1:
                    raise RequestError(503, "", f"a model replica was lost twice ({type(e).__name__}); retry") from None

    # -- routes

    async def lora(self, request):
        from starlette.responses import Response

        fields = await read_form(request, self.cfg.max_request_bytes)
        unknown = sorted(set(fields) - LORA_FIELDS)
        if unknown:
            raise RequestError(422, unknown[0], f"unknown field(s) {unknown}; POST /lora takes {sorted(LORA_FIELDS)}")
        if not fields.get("reference") and not fields.get("reference_uri"):
            raise RequestError(422, "reference", "reference (a file) or reference_uri is required")
        strength = _number(fields, "lora_strength", float)
        strength = self.cfg.generation.lora_strength if strength is None else strength
        from pipelines.manifest import LIMITS

        lo, hi = LIMITS["lora_strength"]
        if not (math.isfinite(strength) and lo <= strength <= hi):
            raise RequestError(422, "lora_strength", f"lora_strength={strength} is outside [{lo}, {hi}]")
        lora = await self._lora(fields)
        data = await self._call(self.generator.export_lora, lora["loras"], lora["weights"], strength)
        return Response(data, media_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="{lora["reference_hash"][:16]}.safetensors"',
            "X-Reference-Hash": lora["reference_hash"], "X-LoRA-Cache-Hit": str(lora["cache_hit"]).lower()})

    async def generate(self, request):
        import dataclasses

        from starlette.responses import Response

        from pipelines.manifest import row_settings
        from video2lora.video_io import decode_image, encode_video

        start = time.perf_counter()
        fields = await read_form(request, self.cfg.max_request_bytes)
        unknown = sorted(set(fields) - GENERATE_FIELDS)
        if unknown:
            raise RequestError(422, unknown[0], f"unknown field(s) {unknown}; POST /generate takes {sorted(GENERATE_FIELDS)}")
        row = {k: _number(fields, k, int) for k in INT_FIELDS} | {k: _number(fields, k, float) for k in FLOAT_FIELDS}
        for k in ("prompt", "negative_prompt"):
            if k in fields and not isinstance(fields[k], str):
                raise RequestError(422, k, f"{k} must be a form field, not a file")
            row[k] = fields.get(k)
        if not row["prompt"]:
            raise RequestError(422, "prompt", "prompt is required")
        row["reference_uri"] = "upload"  # checked below, by _reference
        try:
            settings = row_settings(row, dataclasses.asdict(self.cfg.generation))
        except InputError as e:
            raise RequestError(422, e.field, str(e)) from None
        image = fields.get("image")
        image_pixels = b""
        if image is not None:
            if isinstance(image, str):
                raise RequestError(422, "image", "image must be a file upload")
            try:
                frame = await asyncio.to_thread(decode_image, await image.read(), "image", settings["height"],
                                                settings["width"])
            except Exception as e:  # noqa: BLE001
                raise RequestError(422, "image", error_text(e)) from None
            image_pixels = frames_to_uint8(frame).tobytes()
        t_read = time.perf_counter() - start
        lora = await self._lora(fields)
        item = {**settings, "reference_hash": lora["reference_hash"], "loras": lora["loras"],
                "weights": lora["weights"], "lora_file": lora["lora_file"], "image_pixels": image_pixels}
        made = await self._call(self.generator.generate, item)
        if "error" in made:
            if made["status"] >= 500:
                raise RequestError(500, "", f"generation failed: {made['error']}")
            raise RequestError(made["status"], made["field"], made["error"])
        t0 = time.perf_counter()
        shape = tuple(int(x) for x in made["video_shape"].split(","))
        mp4 = await asyncio.to_thread(lambda: encode_video(uint8_to_frames(made["video"], shape),
                                                           fps=self.cfg.generation.fps))
        t_encode = time.perf_counter() - t0
        return Response(mp4, media_type="video/mp4", headers={
            "X-Seed": str(settings["seed"]), "X-Batch-Size": str(made["batch_size"]),
            "X-Reference-Hash": lora["reference_hash"], "X-LoRA-Cache-Hit": str(lora["cache_hit"]).lower(),
            "X-Generator": made["worker"],
            "Server-Timing": f"read;dur={t_read * 1e3:.1f}, hypernet;dur={lora['t_s'] * 1e3:.1f}, "
                             f"generate;dur={made['t_s'] * 1e3:.1f}, encode;dur={t_encode * 1e3:.1f}, "
                             f"total;dur={(time.perf_counter() - start) * 1e3:.1f}"})


# --- the application ---

def resolve(cfg: ServeConfig, cluster_gpus: float = 0.0) -> ServeConfig:
    """Fill in the embedded default backbone/checkpoint, the backbone's generation defaults and the GPU shares."""
    import dataclasses

    from pipelines import defaults
    from pipelines.batch import apply_backbone_defaults

    backbone = cfg.backbone or defaults.tiny_backbone()
    checkpoint = cfg.checkpoint or defaults.default_checkpoint(backbone)
    gen = dataclasses.replace(cfg.generation)
    explicit = {f.name for f in dataclasses.fields(gen) if getattr(gen, f.name) != getattr(type(gen)(), f.name)}
    job = apply_backbone_defaults(dataclasses.replace(cfg.job_config(), backbone=backbone, generation=gen), explicit)
    has_gpu = cluster_gpus >= 1
    return dataclasses.replace(
        cfg, backbone=backbone, checkpoint=checkpoint, generation=job.generation,
        generator_num_gpus=(1.0 if has_gpu else 0.0) if cfg.generator_num_gpus is None else cfg.generator_num_gpus,
        predictor_num_gpus=(0.25 if has_gpu else 0.0) if cfg.predictor_num_gpus is None else cfg.predictor_num_gpus)


def build_app(args: dict | None = None):
    """The Serve application for `args` (ServeConfig fields; see ServeConfig.from_args)."""
    import ray

    cfg = args if isinstance(args, ServeConfig) else ServeConfig.from_args(args)
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    cfg = resolve(cfg, gpus)
    from video2lora.backbones.step_cost import step_options

    step_options(cfg.generation)  # settings no cache can take fail here, before any replica starts
    cpus = cfg.replica_num_cpus
    if cfg.generator_max_replicas > cfg.generator_replicas:  # autoscale on requests queued or running per replica
        scale = {"autoscaling_config": {"min_replicas": cfg.generator_replicas, "max_replicas": cfg.generator_max_replicas,
                                        "target_ongoing_requests": cfg.batch_size}}
    else:
        scale = {"num_replicas": cfg.generator_replicas}
    generator = Generator.options(
        ray_actor_options={"num_cpus": cpus, "num_gpus": cfg.generator_num_gpus},
        max_ongoing_requests=cfg.batch_size, max_queued_requests=cfg.max_queued_requests, **scale).bind(cfg)
    predictor = LoRAPredictor.options(
        num_replicas=cfg.predictor_replicas, ray_actor_options={"num_cpus": cpus, "num_gpus": cfg.predictor_num_gpus},
        max_ongoing_requests=max(cfg.batch_size, 8), max_queued_requests=cfg.max_queued_requests).bind(cfg)
    queue = cfg.max_queued_requests + cfg.batch_size
    return Video2LoRAApp.options(ray_actor_options={"num_cpus": min(cpus, 0.1)}, max_ongoing_requests=4 * queue,
                                 max_queued_requests=4 * queue).bind(cfg, predictor, generator)


def __getattr__(name):  # `serve run pipelines.serve:app`: the default application, built on first access, so
    # importing this module builds no model
    if name == "app":
        return build_app({})
    raise AttributeError(name)
