"""The batch manifest: schema checked before any work starts, rows checked one by one."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from pipelines.common import ManifestError
from video2lora.config import InputError
from video2lora.storage import fs_and_path, has_credentials, redact

REQUIRED = {"sample_id": "string", "prompt": "string"}
# a row's LoRA comes from exactly one of these: one reference clip, a weighted mix of several, or a LoRA file
SOURCES = ("reference_uri", "reference_uris", "lora_uri")
MAX_REFERENCES = 8  # references in one mix
OPTIONAL = {
    "reference_uri": "string",
    "reference_uris": "list<string>",
    "reference_weights": "list<float>",
    "lora_uri": "string",
    "negative_prompt": "string",
    "reference_prompt": "string",  # the reference's caption: the prompt a refined LoRA is refined with
    "image_uri": "string",
    "seed": "int",
    "num_frames": "int",
    "height": "int",
    "width": "int",
    "steps": "int",
    "guidance_scale": "float",
    "lora_strength": "float",
}
MAX_PROMPT_CHARS = 2000
# frames x height x width of one video: 4x Wan2.1's 81 x 720 x 1280. Each bound above alone still allows a video
# no GPU holds; such a row would OOM-kill its actor, and restarted actors would retry it forever.
MAX_VIDEO_PIXELS = 4 * 81 * 720 * 1280
LIMITS = {"num_frames": (1, 1025), "height": (8, 4096), "width": (8, 4096), "steps": (1, 1000),
          "guidance_scale": (0.0, 100.0), "lora_strength": (0.0, 10.0), "seed": (0, 2**63 - 1),
          "reference_weight": (-10.0, 10.0)}


def _type_ok(kind: str, t: pa.DataType) -> bool:
    if kind.startswith("list<"):
        return pa.types.is_null(t) or ((pa.types.is_list(t) or pa.types.is_large_list(t))
                                       and _type_ok(kind[5:-1], t.value_type))
    if kind == "string":
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


class Manifest:
    """A checked manifest, not yet read: its schema and sample ids are checked, its rows are read in batches
    (`batches`), so a 100k-row manifest is never all in the driver at once."""

    def __init__(self, uri: str, dataset: pads.Dataset, ids: list[str], base: str):
        self.uri, self.dataset, self.ids, self.base = uri, dataset, ids, base
        self.columns = [c for c in dataset.schema.names if c in REQUIRED or c in OPTIONAL]

    def batches(self, rows: int = 4096):
        """Lists of row dicts, `rows` at a time, in manifest order; optional columns filled with None, relative
        reference/image paths resolved against the manifest's folder."""
        for batch in self.dataset.to_batches(columns=self.columns, batch_size=rows):
            out = batch.to_pylist()  # keeps null (None: use the default) apart from NaN (an error)
            for r in out:
                for col in OPTIONAL:
                    r.setdefault(col, None)
            yield resolve_uris(out, self.base)


def _read_failed(uri: str, e: Exception) -> ManifestError:
    # OSError, ArrowInvalid, botocore's own errors...: all mean the same here
    return ManifestError(f"cannot read manifest {redact(uri)}: {type(e).__name__}: {redact(str(e))}")


def open_manifest(uri: str) -> Manifest:
    """Check a Parquet manifest (file or directory, local or s3://) before any work starts: its schema, and that
    every row has a sample_id and no two the same. Reads the footer and the sample_id column only. Raises
    ManifestError."""
    if has_credentials(uri):  # a library's message could quote them in pieces; the URI is not shown either
        raise ManifestError("the manifest URI has credentials in it (user:password@...): give them to the job's environment instead")
    fs, path = fs_and_path(uri)
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        schema = dataset.schema
    except Exception as e:  # noqa: BLE001
        raise _read_failed(uri, e) from None
    missing = [c for c in REQUIRED if c not in schema.names]
    if not any(c in schema.names for c in SOURCES):
        missing.append(" or ".join(SOURCES))
    if missing:
        raise ManifestError(f"manifest {redact(uri)} lacks required column(s) {missing}; it has {schema.names}")
    for col, kind in {**REQUIRED, **OPTIONAL}.items():
        if col in schema.names and not _type_ok(kind, schema.field(col).type):
            raise ManifestError(f"manifest column {col!r} has type {schema.field(col).type}, expected {kind}")
    try:
        ids = dataset.to_table(columns=["sample_id"]).column("sample_id").to_pylist()
    except Exception as e:  # noqa: BLE001
        raise _read_failed(uri, e) from None
    no_id = [i for i, sid in enumerate(ids) if not sid]
    if no_id:
        raise ManifestError(f"manifest rows {no_id[:10]} have no sample_id")
    series = pd.Series(ids)
    dup = series[series.duplicated()].unique().tolist()
    if dup:
        raise ManifestError(f"duplicate sample_id values: {dup[:10]}{' ...' if len(dup) > 10 else ''}")
    base = uri if fs.isdir(path) else uri.rsplit("/", 1)[0] if "/" in uri else "."
    return Manifest(uri, dataset, ids, base)


def read_manifest(uri: str) -> list[dict]:
    """Every row of a checked manifest at once (small manifests; the batch job reads `open_manifest(...).batches()`)."""
    manifest = open_manifest(uri)
    try:
        return [r for batch in manifest.batches() for r in batch]
    except Exception as e:  # noqa: BLE001
        raise _read_failed(uri, e) from None


# what row_settings returns: the typed per-row columns the batch stages read (str, int or float, never JSON)
SETTING_COLUMNS = ("prompt", "negative_prompt", "seed", "num_frames", "height", "width", "steps", "guidance_scale",
                   "lora_strength", "reference_prompt")


def _one_reference(weights) -> bool:
    """Exactly one reference at weight 1 (not a mix)."""
    return [float(w) for w in weights] == [1.0]


def refined(weights, lora_uri: str, lora_strength: float) -> bool:
    """Whether a refining job (GenerationConfig.refine_steps > 0) refines a row's LoRA: one reference at weight 1,
    applied (strength not 0). A LoRA file has no reference; a mix is refused (`refine_refusal`)."""
    return not lora_uri and _one_reference(weights) and bool(lora_strength)


def refine_refusal(planned: dict) -> InputError | None:
    """A refining job's reason to refuse a planned row: a mix (several references, or one at another weight)."""
    if planned["lora_uri"] or _one_reference(planned["reference_weights"]):
        return None
    return InputError("reference_uris", "reference_uris: refine_steps > 0 refines the LoRA of one reference at "
                      "weight 1; this row mixes references: give one reference_uri, or refine_steps 0")


def row_settings(row: dict, defaults: dict) -> dict:
    """Per-row generation settings (manifest value or job default), checked: one value per SETTING_COLUMNS name.
    Raises ValueError naming the field."""
    out = {}
    for col in ("num_frames", "height", "width", "steps", "guidance_scale", "lora_strength", "seed"):
        value = row.get(col)
        if value is None:
            value = defaults[col]
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(col, f"{col}={value} is not a finite number")
        lo, hi = LIMITS[col]
        if not lo <= value <= hi:
            raise InputError(col, f"{col}={value} is outside [{lo}, {hi}]")
        if OPTIONAL[col] == "int":
            if isinstance(value, float) and not value.is_integer():  # pandas stores ints with gaps as floats
                raise InputError(col, f"{col}={value} is not a whole number")
            value = int(value)
        out[col] = value if OPTIONAL[col] == "int" else float(value)
    pixels = out["num_frames"] * out["height"] * out["width"]
    if pixels > MAX_VIDEO_PIXELS:
        raise InputError("num_frames", f"num_frames x height x width = {out['num_frames']} x {out['height']} x {out['width']} = "
                         f"{pixels:,} pixels, more than {MAX_VIDEO_PIXELS:,} per video")
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise InputError("prompt", f"prompt is not text ({type(prompt).__name__})")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError("prompt", f"prompt has {len(prompt)} characters, more than {MAX_PROMPT_CHARS}")
    negative = row.get("negative_prompt")
    out["prompt"] = prompt
    out["negative_prompt"] = defaults["negative_prompt"] if negative is None else str(negative)
    caption = row.get("reference_prompt")
    if caption is not None and not isinstance(caption, str):
        raise InputError("reference_prompt", f"reference_prompt is not text ({type(caption).__name__})")
    if caption and len(caption) > MAX_PROMPT_CHARS:
        raise InputError("reference_prompt", f"reference_prompt has {len(caption)} characters, more than {MAX_PROMPT_CHARS}")
    out["reference_prompt"] = caption or ""
    if has_credentials(row.get("image_uri") or ""):  # the URI itself is left out of the message
        raise InputError("image_uri", "image_uri has credentials in it (user:password@...): give them to the job's "
                                      "environment instead")
    return out


def _listed(value) -> list | None:
    """A list column's cell (a list, or the array pandas / Arrow give) as a list; None stays None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return [value]
    return list(value)


def row_sources(row: dict) -> dict:
    """Where a row's LoRA comes from, checked: {"reference_uris": [...], "reference_weights": [...], "lora_uri":
    ""} for one reference (weight 1) or a mix (weights default to 1 / count), or no references and a LoRA file.
    Raises InputError naming the column."""
    uris, weights, lora = _listed(row.get("reference_uris")), _listed(row.get("reference_weights")), row.get("lora_uri")
    single = row.get("reference_uri")
    given = [c for c, v in (("reference_uri", single), ("reference_uris", uris), ("lora_uri", lora)) if v]
    if len(given) > 1:
        raise InputError(given[1], f"give one of {', '.join(SOURCES)} per row, not {' and '.join(given)}")
    if not given:
        raise InputError("reference_uri", "reference_uri is empty (give reference_uri, reference_uris or lora_uri)")
    if weights is not None and not uris:
        raise InputError("reference_weights", "reference_weights needs reference_uris (the references it weighs)")
    for col, v in (("reference_uri", single), ("lora_uri", lora)):
        if v and not isinstance(v, str):
            raise InputError(col, f"{col} is not text ({type(v).__name__})")
    if lora:
        if has_credentials(lora):
            raise InputError("lora_uri", "lora_uri has credentials in it (user:password@...): give them to the job's "
                                         "environment instead")
        return {"reference_uris": [], "reference_weights": [], "lora_uri": lora}
    if single:
        uris, weights = [single], [1.0]
    col = "reference_uris" if row.get("reference_uris") else "reference_uri"
    if not 1 <= len(uris) <= MAX_REFERENCES:
        raise InputError(col, f"reference_uris has {len(uris)} references; a mix takes 1 to {MAX_REFERENCES}")
    if not all(isinstance(u, str) and u for u in uris):
        raise InputError(col, "reference_uris has an empty or non-text entry")
    if any(has_credentials(u) for u in uris):
        raise InputError(col, f"{col} has credentials in it (user:password@...): give them to the job's environment "
                              "instead")
    if weights is None:
        weights = [1.0 / len(uris)] * len(uris)
    if len(weights) != len(uris):
        raise InputError("reference_weights", f"reference_weights has {len(weights)} weights for {len(uris)} references")
    lo, hi = LIMITS["reference_weight"]
    for w in weights:
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or not lo <= w <= hi:
            raise InputError("reference_weights", f"reference_weights has {w!r}: each must be a finite number in "
                                                  f"[{lo}, {hi}]")
    return {"reference_uris": uris, "reference_weights": [float(w) for w in weights], "lora_uri": ""}


def resolve_uris(rows: list[dict], base: str) -> list[dict]:
    """Relative reference/image paths are relative to the manifest's folder `base`, so a manifest travels with its
    clips."""
    import posixpath

    from video2lora.storage import join

    def resolved(v):
        return join(base, v) if isinstance(v, str) and v and "://" not in v and not posixpath.isabs(v) else v

    for r in rows:
        for col in ("reference_uri", "image_uri", "lora_uri"):
            r[col] = resolved(r.get(col))
        if isinstance(r.get("reference_uris"), list):
            r["reference_uris"] = [resolved(v) for v in r["reference_uris"]]
    return rows
