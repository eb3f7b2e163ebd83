"""A results page for a batch run: OUTPUT/index.html with a small animated preview per row (reference and
generated video), prompt, weights, status or error and stage timings; failed rows first, a filter by status.
Previews (GIFs under OUTPUT/gallery/) are made by CPU tasks on the cluster, not in the driver. Works for a local or
an s3:// output (the page links its previews relatively)."""

from __future__ import annotations

import html
import io
import json
import logging
import posixpath

from video2lora.storage import exists, join, read_bytes, redact, safe_child, write_bytes_atomic

logger = logging.getLogger(__name__)

JOB_NAME = "job.json"  # written by the batch job: which manifest made this output
PREVIEW_FRAMES, PREVIEW_HEIGHT = 8, 96
STATUS_ORDER = {"failed": 0, "skipped": 1, "ok": 2}


def _gif(uri: str) -> bytes:
    """A small looping GIF of a clip: PREVIEW_FRAMES frames over its whole length, PREVIEW_HEIGHT px high."""
    from PIL import Image

    from video2lora.video_io import decode_video, probe_video

    data = read_bytes(uri, max_bytes=1 << 30)
    meta = probe_video(data, uri)
    width = max(2, round(PREVIEW_HEIGHT * meta["width"] / max(meta["height"], 1) / 2) * 2)
    frames = decode_video(data, uri, PREVIEW_FRAMES, PREVIEW_HEIGHT, width)  # (3, F, H, W) in [-1, 1]
    pixels = ((frames.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
    images = [Image.fromarray(p) for p in pixels]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=150, loop=0)
    return buf.getvalue()


def make_previews(items: list[tuple[str, str]], gallery_uri: str) -> dict[str, str]:
    """(preview name, clip URI) -> {name: error text, "" when written}. One bad clip spoils only its preview."""
    out = {}
    for name, uri in items:
        try:
            write_bytes_atomic(safe_child(gallery_uri, f"{name}.gif"), _gif(uri))
            out[name] = ""
        except Exception as e:  # noqa: BLE001
            out[name] = redact(f"{type(e).__name__}: {e}")[:300]
    return out


def _manifest_rows(output: str) -> dict[str, dict]:
    """The rows of the manifest that made this output (job.json), by sample_id; {} if it cannot be read."""
    from pipelines.manifest import open_manifest

    uri = join(output, JOB_NAME)
    if not exists(uri):
        return {}
    try:
        manifest = open_manifest(json.loads(read_bytes(uri))["manifest"])
        return {r["sample_id"]: r for batch in manifest.batches() for r in batch}
    except Exception as e:  # noqa: BLE001 - the page still shows the results
        logger.warning("gallery: cannot read the run's manifest (%s); prompts and references left out", e)
        return {}


def write_gallery(output: str, previews_per_task: int = 8, num_cpus: float = 0.25) -> str:
    """Write OUTPUT/index.html (and the previews) for a finished or partial run; returns the page's URI.
    Ray must be initialised (previews are Ray tasks)."""
    import pandas as pd
    import ray

    from pipelines.batch import RESULTS_NAME

    results = pd.read_parquet(io.BytesIO(read_bytes(join(output, RESULTS_NAME)))).to_dict("records")
    manifest = _manifest_rows(output)
    gallery = join(output, "gallery")
    items = []
    for r in results:
        m = manifest.get(r["sample_id"], {})
        refs = list(m.get("reference_uris") or ([m["reference_uri"]] if m.get("reference_uri") else []))
        r["_refs"] = [(f"{r['sample_id']}.ref{i}", u) for i, u in enumerate(refs)]
        items += r["_refs"]
        if r["status"] in ("ok", "skipped") and r.get("output_uri"):
            items.append((f"{r['sample_id']}.out", r["output_uri"]))
        r["_manifest"] = m
    task = ray.remote(num_cpus=num_cpus)(make_previews)
    chunks = [items[i: i + previews_per_task] for i in range(0, len(items), previews_per_task)]
    errors: dict[str, str] = {}
    for done in ray.get([task.remote(c, gallery) for c in chunks]):
        errors.update(done)
    results.sort(key=lambda r: (STATUS_ORDER.get(r["status"], 3), r["sample_id"]))
    page = render_page(results, errors, output)
    uri = join(output, "index.html")
    write_bytes_atomic(uri, page.encode())
    return uri


def _preview(name: str, errors: dict, label: str) -> str:
    if name not in errors:
        return f'<div class="none">{label}: none</div>'
    if errors[name]:
        return f'<div class="none" title="{html.escape(errors[name])}">{label}: no preview</div>'
    return f'<figure><img src="gallery/{html.escape(name)}.gif" alt="{label}"><figcaption>{label}</figcaption></figure>'


def render_page(results: list[dict], errors: dict, output: str) -> str:
    counts: dict[str, int] = {}
    rows = []
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        m = r["_manifest"]
        weights = m.get("reference_weights")
        refs = "".join(_preview(n, errors, f"reference {i + 1}" + (f" x {weights[i]:g}" if weights else ""))
                       for i, (n, _) in enumerate(r["_refs"])) or (
            f'<div class="none">LoRA file {html.escape(posixpath.basename(str(m.get("lora_uri") or "")))}</div>'
            if m.get("lora_uri") else '<div class="none">reference: unknown</div>')
        timings = " · ".join(f"{s} {float(r[f't_{s}_s']):.2f} s" for s in ("fetch", "hypernet", "generate", "write")
                             if r.get(f"t_{s}_s") is not None and r[f"t_{s}_s"] == r[f"t_{s}_s"])
        detail = html.escape(str(r.get("error") or "")) if r["status"] != "ok" else ""
        rows.append(f"""<tr class="row" data-status="{html.escape(r['status'])}">
<td><code>{html.escape(r['sample_id'])}</code><br><span class="status {html.escape(r['status'])}">{html.escape(r['status'])}</span>
<div class="error">{detail}</div></td>
<td class="media">{refs}</td>
<td class="media">{_preview(f"{r['sample_id']}.out", errors, "generated")}</td>
<td>{html.escape(str(m.get('prompt') or ''))}<div class="meta">seed {html.escape(str(m.get('seed') if m.get('seed') is not None else 'default'))}
{'· strength ' + format(m['lora_strength'], 'g') if m.get('lora_strength') is not None else ''}</div></td>
<td class="meta">{timings}</td></tr>""")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: STATUS_ORDER.get(kv[0], 3)))
    options = "".join(f'<option value="{html.escape(s)}">{html.escape(s)} ({n})</option>' for s, n in counts.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Video2LoRA run: {html.escape(redact(output))}</title>
<link rel="icon" href="data:,">
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ border-bottom: 1px solid #ddd; padding: 6px; vertical-align: top; text-align: left; }}
.media {{ white-space: nowrap; }} figure {{ display: inline-block; margin: 0 6px 0 0; }} figcaption, .meta {{ color: #666; font-size: 12px; }}
img {{ height: {PREVIEW_HEIGHT}px; image-rendering: pixelated; background: #000; }}
.status {{ font-weight: bold; }} .failed {{ color: #b00; }} .ok {{ color: #070; }} .skipped {{ color: #666; }}
.error {{ color: #b00; font-size: 12px; max-width: 28em; white-space: normal; }} .none {{ color: #999; display: inline-block; margin-right: 6px; }}
</style></head>
<body><h1>Video2LoRA run</h1><p><code>{html.escape(redact(output))}</code>: {len(results)} rows, {html.escape(summary)}</p>
<label>Show <select id="status"><option value="">all</option>{options}</select></label>
<table><thead><tr><th>row</th><th>reference</th><th>video</th><th>prompt</th><th>stage timings</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<script>
document.getElementById("status").addEventListener("change", e => {{
  for (const tr of document.querySelectorAll("tr.row"))
    tr.style.display = !e.target.value || tr.dataset.status === e.target.value ? "" : "none";
}});
</script></body></html>
"""
