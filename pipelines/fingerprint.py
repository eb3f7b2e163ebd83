"""What made a row's video, as a hash: a resume keeps a finished row only when its fingerprint is the one the
manifest and flags give it now (pipelines/batch.py).

A fingerprint covers the row's sources (reference, image and LoRA URIs, relative to the manifest's folder when
inside it, so the same manifest opened by another spelling of its path keeps its fingerprints), its typed settings
(prompts, seed, size, steps, CFG scale, strength) and the job's: the checkpoint and backbone by content (their
files move, e.g. under `ray job submit --working-dir`), the frame rate, VAE tiling, the reference decode size, and
the step cache with only the fields that cache reads, and the refinement settings when refining (then also
the row's reference caption). Compiled blocks and fused projections change only float
rounding and are left out. A reference's URI is hashed, not its bytes (reading every reference would cost a
resume its speed).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath

from video2lora.storage import fs_and_path, join, read_bytes


def _digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def checkpoint_identity(uri: str, files: tuple[bytes, bytes] | None = None) -> str:
    """The Video2LoRA checkpoint by its config and weights bytes ("" for none); `files`: those bytes, if read."""
    if not uri:
        return ""
    from video2lora.hypernet import read_checkpoint_files

    return _digest(files or read_checkpoint_files(uri))


def backbone_identity(uri: str) -> str:
    """The frozen backbone by the content of its JSON files (pipeline index, component configs, generation
    defaults) and the name and size of every other file: its weights (GBs at full size) are not read."""
    if not uri:
        return ""
    fs, root = fs_and_path(uri)
    files = sorted(fs.find(root, detail=True).items())
    parts = []
    for path, info in files:
        rel = posixpath.relpath(path, root) if "://" in uri else os.path.relpath(path, root)
        parts += [rel, read_bytes(join(uri, rel)) if rel.endswith(".json") else info.get("size")]
    return _digest(parts)


def job_signature(cfg, checkpoint_id: str | None = None) -> dict:
    """What, beside its own columns, makes every row's video (cfg: a BatchJobConfig). `checkpoint_id`: the
    checkpoint's identity if already computed (its weights, 155-310 MB at 5B, are then not read again)."""
    from video2lora.backbones.step_cost import cache_signature

    g = cfg.generation
    if checkpoint_id is None:
        checkpoint_id = checkpoint_identity(cfg.checkpoint)
    return {"checkpoint": checkpoint_id, "backbone": backbone_identity(cfg.backbone),
            "fps": int(g.fps), "vae_tiling": g.vae_tiling,
            "reference_size": [int(g.num_frames), int(g.height), int(g.width)],  # references are decoded at it
            "step_cache": cache_signature(g),
            # refinement (GenerationConfig.refine_*) only when on: jobs without it keep their fingerprints
            **({"refine": [int(g.refine_steps), float(g.refine_lr), int(g.refine_draws), int(g.seed)]
                + ([] if g.refine_steps_unfamiliar is None else [int(g.refine_steps_unfamiliar)])}
               if g.refine_steps else {})}


def portable(uri: str, base: str) -> str:
    """A source URI relative to the manifest's folder `base` when inside it, else as it is."""
    if not uri or not base:
        return uri
    if "://" in uri:
        prefix = base.rstrip("/") + "/"
        return uri[len(prefix):] if uri.startswith(prefix) else uri
    if "://" in base:
        return uri
    path, folder = os.path.abspath(uri), os.path.abspath(base)
    return os.path.relpath(path, folder) if path.startswith(folder.rstrip(os.sep) + os.sep) else path


def row_fingerprint(planned: dict, job: dict, base: str) -> str:
    """The fingerprint of a planned row (pipelines.batch.plan_row's dict, sample_id aside) under `job`."""
    from pipelines.manifest import refined

    spec = {k: v for k, v in planned.items() if k not in ("sample_id", "row_fingerprint")}
    # refinement and the caption it reads count only for rows a refining job refines: other rows, and every row
    # of a job without it, keep the fingerprints they had before either existed
    if "refine" in job and refined(spec.get("reference_weights") or [], spec.get("lora_uri") or "",
                                   spec.get("lora_strength", 1.0)):
        if not spec.get("reference_prompt"):
            spec.pop("reference_prompt", None)
    else:
        job = {k: v for k, v in job.items() if k != "refine"}
        spec.pop("reference_prompt", None)
    for col in ("image_uri", "lora_uri"):
        spec[col] = portable(spec.get(col) or "", base)
    spec["reference_uris"] = [portable(u, base) for u in spec.get("reference_uris") or []]
    return _digest([json.dumps({"row": spec, "job": job}, sort_keys=True, default=str)])

