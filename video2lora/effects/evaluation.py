"""The synthetic-effects benchmark's scoring (`jobs/evaluate.py` runs it): fresh reference rows, the effect classifier
(the judge) trained on real clips, every generated video judged, the table, and a contact sheet per effect.

It imports the method and the effects world, never the pipelines: generation is the job's (Ray batch pipeline, and
the per-effect baseline through `video2lora.generate`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
import zlib

import numpy as np
import torch

from .. import storage
from ..video_io import read_video, write_video
from . import judge as ec
from . import world as fx

logger = logging.getLogger(__name__)

METHODS = ("video2lora", "no_lora", "per_effect_lora")
# how `build_rows` draws rows, recorded in every results.json (a score is reused only under the same one):
# 2 = each row its own generation seed and content scene (from 2026-12-06); 1 = every effect's rows shared 8
ROW_PROTOCOL = 2
# the extra references of `build_rows(references_per_row > 1)` come from this offset of the seed (other scenes)
MORE_REFERENCES_SEED = 104729
# two seen, two held out by the shipped checkpoint (compounds; docs/EFFECTS.md)
QUICK_EFFECTS = ("zoom_out+invert", "spin+pixelate", "zoom_out+pixelate", "slide_left+blur_in")


# --------------------------------------------------------------------------------------------- the judge
def load_clips(manifest_uri: str, num_frames: int = 9, size: int = 32):
    """Clips of a `jobs/make_effects.py` manifest decoded from their mp4s: (N,3,F,H,W) and labels per head."""
    import pandas as pd

    df = pd.read_parquet(io.BytesIO(storage.read_bytes(manifest_uri)))
    base = manifest_uri.rsplit("/", 1)[0]
    clips = [read_video(u if ("://" in u or u.startswith("/")) else storage.join(base, u), num_frames, size, size)
             for u in df["video_uri"]]
    labels = {h: df[h].astype(str).tolist() for h in ("effect", "shape", "colour", "background")}
    return torch.stack(clips), labels


def train_judge(train_manifest: str, test_manifest: str, out: str, epochs: int = 15, seed: int = 0) -> dict:
    """Train the effect classifier on real clips (mp4, every effect and the static class), report its accuracy on
    real held-out clips, save it (safetensors) with `report.json`."""
    start = time.perf_counter()
    x, y = load_clips(train_manifest)
    xt, yt = load_clips(test_manifest)
    logger.info("training the effect classifier on %d real clips (%d test clips)", len(x), len(xt))
    model = ec.train_classifier(x, y, epochs=epochs, seed=seed, verbose=True)
    acc = ec.evaluate(model, xt, yt)
    per_class = ec.per_class_accuracy(model.predict(xt)["effect"], yt["effect"])
    ec.save(model, out)
    report = {"test_accuracy": acc, "test_effect_accuracy_per_class": per_class, "train_clips": len(x),
              "test_clips": len(xt), "epochs": epochs, "seconds": time.perf_counter() - start,
              "train_manifest": train_manifest, "test_manifest": test_manifest}
    storage.write_bytes_atomic(storage.join(out, "report.json"), json.dumps(report, indent=2).encode())
    logger.info("classifier accuracy on real held-out clips: %s", {k: round(v, 3) for k, v in acc.items()})
    return report


# --------------------------------------------------------------------------------------------- the rows
#: how the tables group rows: effects seen in hypernetwork training, held out, held out with a whole new family
SPLITS: tuple[str, ...] = ("seen", "held-out", "held-out family")


def row_split(effect: str) -> str:
    """The table group of an effect: "seen", "held-out", or "held-out family" (a part of a family no training clip
    has, e.g. wave@0.25+fade@1)."""
    if fx.effect_split(effect) == "train":
        return "seen"
    return "held-out family" if fx.held_out_family(effect) else "held-out"


def build_rows(out: str, seed: int, effects, refs_per_effect: int, references_per_row: int = 1) -> list[dict]:
    """Fresh references per effect and, for each, a prompt of a fresh *other* scene. Writes refs/*.mp4.

    Every row is its own sample: its content scene is drawn for its effect (not shared with the other effects' rows)
    and it has its own generation seed, so no two rows of an evaluation make the same no-LoRA video and the
    standard errors count independent rows. Both depend only on (seed, effect, index), not on the other effects.

    `references_per_row` > 1 gives each row that many clips of its effect (`reference_uris`: its own reference first,
    then fresh clips, none shared between rows and none of the scene the row's prompt asks for): the user who has
    several clips of an effect and mixes their LoRAs with equal weights. The rows, prompts and seeds are those of
    one reference per row."""
    if references_per_row < 1:
        raise ValueError(f"references_per_row={references_per_row}: a row needs at least one reference")
    os.makedirs(os.path.join(out, "refs"), exist_ok=True)
    rows = []
    for effect in effects:
        refs = fx.make_dataset(seed, refs_per_effect, effects=[effect])
        extra = references_per_row - 1
        # twice the clips needed: a clip of the scene a row's prompt asks for is skipped for that row
        pool = iter(fx.make_dataset(seed + MORE_REFERENCES_SEED, 2 * refs_per_effect * extra, effects=[effect])
                    if extra else [])
        others = fx.make_dataset(row_seed(seed + 7919, effect, 0), refs_per_effect * 3, effects=[fx.NONE])
        others = [o for o in others if all(o["prompt"] != r["prompt"] for r in refs)]
        for i, ref in enumerate(refs):
            content = others[i % len(others)]
            name = f"{fx.effect_slug(effect)}__{i}"  # a file and sample name (no '+')
            uri = os.path.join(out, "refs", f"{name}.mp4")
            write_video(uri, torch.from_numpy(ref["video"]))
            uris, prompts = [uri], [ref["prompt"]]
            while len(uris) < references_per_row:
                clip = next(pool, None)
                if clip is None:
                    raise RuntimeError(f"{effect}: too few fresh clips for {references_per_row} references per row")
                if clip["prompt"] != content["prompt"]:
                    uris.append(os.path.join(out, "refs", f"{name}__more{len(uris) - 1}.mp4"))
                    prompts.append(clip["prompt"])
                    write_video(uris[-1], torch.from_numpy(clip["video"]))
            rows.append({"name": name, "effect": effect, "split": row_split(effect), "reference_uri": uri,
                         "reference_uris": uris, "reference_prompt": ref["prompt"], "reference_prompts": prompts,
                         "prompt": content["prompt"],
                         "shape": content["shape"], "colour": content["colour"], "background": content["background"],
                         "seed": row_seed(seed, effect, i)})
    return rows


def row_seed(seed: int, effect: str, index: int) -> int:
    """A generation seed of its own for row `index` of `effect` (31 bits, from the names: stable across runs)."""
    return zlib.crc32(f"{seed}/{effect}/{index}".encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------- scoring
def score(rows: list[dict], out: str, classifier_uri: str, methods) -> list[dict]:
    judge = ec.load(classifier_uri)
    results = []
    for method in methods:
        have = [(r, os.path.join(out, "gen", "videos", f"{method}__{r['name']}.mp4")) for r in rows]
        have = [(r, p) for r, p in have if os.path.exists(p)]
        if not have:
            continue
        clips = torch.stack([read_video(p, 9, 32, 32) for _, p in have])
        pred = judge.predict(clips)
        for k, (r, p) in enumerate(have):
            content = [pred[h][k] == r[h] for h in ("shape", "colour", "background")]
            (pred_motion, pred_look), (motion, look) = fx.effect_factors(pred["effect"][k]), fx.effect_factors(r["effect"])
            results.append({**r, "method": method, "video": p, "pred_effect": pred["effect"][k],
                            "pred_shape": pred["shape"][k], "pred_colour": pred["colour"][k],
                            "pred_background": pred["background"][k], "effect_ok": pred["effect"][k] == r["effect"],
                            # compounds: did the motion / the look come across, each on its own
                            "motion_ok": pred_motion == motion, "look_ok": pred_look == look,
                            "content": float(np.mean(content))})
    return results


def psnr(video: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak-to-peak 2), capped at 100 dB (identical videos)."""
    mse = float(((video.float() - ref.float()) ** 2).mean())
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(4.0 / mse))


def mean_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n); 0 for a single value)."""
    x = np.asarray(values, dtype=float)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def table(results: list[dict]) -> tuple[str, dict]:
    """The markdown table (every cell: mean ± standard error over its rows) and the same numbers as a dict."""
    cells = {}
    compound = any("+" in r["effect"] for r in results)  # then also: motion and look, each on its own
    extra = " motion accuracy | look accuracy |" if compound else ""
    lines = ["| method | split | rows | effect accuracy |" + extra + " content fidelity |",
             "|---|---|---|---|" + ("---|---|" if compound else "") + "---|"]
    for method in METHODS:
        for split in SPLITS:
            sel = [r for r in results if r["method"] == method and r["split"] == split]
            if not sel:
                continue
            cell = {"rows": len(sel)}
            keys = ["effect_accuracy"] + (["motion_accuracy", "look_accuracy"] if compound else []) + ["content_fidelity"]
            fields = {"effect_accuracy": "effect_ok", "motion_accuracy": "motion_ok", "look_accuracy": "look_ok",
                      "content_fidelity": "content"}
            for key in keys:
                cell[key], cell[key + "_se"] = mean_se([float(r[fields[key]]) for r in sel])
            cells[f"{method}/{split}"] = cell
            lines.append(f"| {method} | {split} | {len(sel)} | "
                         + " | ".join(f"{cell[k]:.2f} ± {cell[k + '_se']:.2f}" for k in keys) + " |")
    per_effect = {}
    for r in results:
        per_effect.setdefault(r["effect"], {}).setdefault(r["method"], []).append(r["effect_ok"])
    lines += ["", "Effect accuracy per effect:", "", "| effect | split | " + " | ".join(METHODS) + " |",
              "|---|---|" + "---|" * len(METHODS)]
    for effect, by in per_effect.items():
        split = next(r["split"] for r in results if r["effect"] == effect)
        vals = [f"{np.mean(by[m]):.2f}" if m in by else "-" for m in METHODS]
        lines.append(f"| {effect} | {split} | " + " | ".join(vals) + " |")
    return "\n".join(lines), cells


def selection_score(cells: dict) -> float:
    """What the recipe's select stage maximises: the mean of seen and held-out effect accuracy, held-out pooling
    every held-out row (a small held-out-family cell does not outweigh its rows)."""
    held = [cells[f"video2lora/{s}"] for s in SPLITS[1:] if f"video2lora/{s}" in cells]
    pooled = sum(c["effect_accuracy"] * c["rows"] for c in held) / sum(c["rows"] for c in held)
    return (cells["video2lora/seen"]["effect_accuracy"] + pooled) / 2


def selection_markdown(candidates: list[tuple[int, dict]], chosen: int, seed: int, refs_per_effect: int) -> str:
    """The recipe's select-stage table: (step, `table` cells) per checkpoint, then no LoRA (from the first)."""
    def cell(c, key):
        return f"{c[key]:.2f} ± {c[key + '_se']:.2f}"
    splits = [s for s in SPLITS if any(f"video2lora/{s}" in t for _, t in candidates)]
    lines = [f"Validation seed {seed} ({refs_per_effect} references per effect): every kept checkpoint; chosen: step "
             f"{chosen} (highest mean of seen and held-out effect accuracy, every held-out row pooled)", "",
             "| checkpoint | " + " | ".join(f"effect acc. {s}" for s in splits) + " | "
             + " | ".join(f"content fidelity {s}" for s in splits) + " |", "|---|" + "---|" * 2 * len(splits)]
    for name, method, t in [(f"step {s}" + (" (chosen)" if s == chosen else ""), "video2lora", t) for s, t in candidates] + [
            ("no LoRA", "no_lora", candidates[0][1])]:
        got = [t.get(f"{method}/{s}") for s in splits]  # "-": a cell this candidate's rows do not have
        lines.append(f"| {name} | " + " | ".join(cell(c, "effect_accuracy") if c else "-" for c in got) + " | "
                     + " | ".join(cell(c, "content_fidelity") if c else "-" for c in got) + " |")
    return "\n".join(lines) + "\n"


def contact_sheets(rows: list[dict], results: list[dict], out: str, scale: int = 3) -> list[str]:
    """One PNG per effect: for each reference, a row of its frames, then one row per method's generated frames."""
    from PIL import Image, ImageDraw

    def strip(video: torch.Tensor) -> np.ndarray:
        a = ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()  # F H W 3
        return np.concatenate(list(a), axis=1)

    label_w, paths = 150, []
    os.makedirs(os.path.join(out, "sheets"), exist_ok=True)
    by_name = {(r["method"], r["name"]): r for r in results}
    for effect in dict.fromkeys(r["effect"] for r in rows):
        strips, labels = [], []
        for r in (x for x in rows if x["effect"] == effect):
            strips.append(strip(read_video(r["reference_uri"], 9, 32, 32)))
            labels.append(f"reference: {effect}")
            for m in METHODS:
                res = by_name.get((m, r["name"]))
                if res is not None:
                    strips.append(strip(read_video(res["video"], 9, 32, 32)))
                    labels.append(f"{m} -> {res['pred_effect']}")
        if not strips:
            continue
        grid = np.concatenate(strips, axis=0)
        img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
        sheet = Image.new("RGB", (img.width + label_w, img.height + 16), "white")
        sheet.paste(img, (label_w, 16))
        draw = ImageDraw.Draw(sheet)
        draw.text((4, 2), f"{effect} ({rows[[x['effect'] for x in rows].index(effect)]['split']})", fill="black")
        for k, text in enumerate(labels):
            draw.text((4, 16 + k * 32 * scale + 4), text, fill="black")
        p = os.path.join(out, "sheets", f"{effect}.png")
        sheet.save(p)
        paths.append(p)
    return paths
