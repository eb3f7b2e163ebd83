"""Synthetic-effects benchmark: does the hypernetwork carry a reference's effect onto new content, zero-shot?

    python jobs/evaluate.py --checkpoint video2lora/assets/checkpoint --seed 7            # the full table
    python jobs/evaluate.py --quick                                                        # CI: a few rows
    python jobs/evaluate.py --train-classifier --classifier-out outputs/effects/classifier # the judge

For every effect (seen in hypernetwork training, or held out) it renders fresh reference clips and pairs each with
a prompt describing *other* content (a fresh scene; `--seed` draws new ones). Three methods generate a video per
row with the same frozen backbone, seed and sampler:

* `video2lora`: the hypernetwork reads the reference and predicts its LoRA (through the Ray batch pipeline,
  `pipelines/batch.py`, exactly as `jobs/batch_generate.py` runs it);
* `no_lora`: the backbone alone (the same pipeline run, rows with lora_strength 0);
* `per_effect_lora`: one ordinary LoRA trained per effect on that effect's clips (`video2lora.effects.baselines`), the
  per-effect approach that Video2LoRA replaces (generated through the library, same sampler and seeds).

The judge does not trust the model under test: an effect classifier trained on real dataset clips
(`video2lora.effects.judge`) labels every generated video. Effect accuracy = how often the generated video is
classified as the reference's effect; content fidelity = how often its shape / colour / background heads match
the prompt (mean of the three). Output: `table.md` (printed), `results.json` (every row), and a contact sheet per
effect in `sheets/` (reference next to the generated frames of each method) so a person can look.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

logger = logging.getLogger("evaluate")

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "video2lora", "assets", "checkpoint")
METHODS = ("video2lora", "no_lora", "per_effect_lora")
# two seen, two held out by the shipped checkpoint (compounds; docs/EFFECTS.md)
QUICK_EFFECTS = ("zoom_out+invert", "spin+pixelate", "zoom_out+pixelate", "slide_left+blur_in")


# --------------------------------------------------------------------------------------------- the judge
def load_clips(manifest_uri: str, num_frames: int = 9, size: int = 32):
    """Clips of a `jobs/make_effects.py` manifest decoded from their mp4s: (N,3,F,H,W) and labels per head."""
    import pandas as pd

    from video2lora import storage
    from video2lora.video_io import read_video

    df = pd.read_parquet(io.BytesIO(storage.read_bytes(manifest_uri)))
    base = manifest_uri.rsplit("/", 1)[0]
    clips = [read_video(u if ("://" in u or u.startswith("/")) else storage.join(base, u), num_frames, size, size)
             for u in df["video_uri"]]
    labels = {h: df[h].astype(str).tolist() for h in ("effect", "shape", "colour", "background")}
    return torch.stack(clips), labels


def train_judge(train_manifest: str, test_manifest: str, out: str, epochs: int = 15, seed: int = 0) -> dict:
    """Train the effect classifier on real clips (mp4, every effect and the static class), report its accuracy on
    real held-out clips, save it (safetensors) with `report.json`."""
    from video2lora.effects import judge as ec
    from video2lora import storage

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
def build_rows(out: str, seed: int, effects, refs_per_effect: int) -> list[dict]:
    """Fresh references per effect and, for each, a prompt of a fresh *other* scene. Writes refs/*.mp4."""
    from video2lora.effects import world as fx
    from video2lora.video_io import write_video

    os.makedirs(os.path.join(out, "refs"), exist_ok=True)
    rows = []
    for effect in effects:
        refs = fx.make_dataset(seed, refs_per_effect, effects=[effect])
        others = fx.make_dataset(seed + 7919, refs_per_effect * 3, effects=[fx.NONE])
        others = [o for o in others if all(o["prompt"] != r["prompt"] for r in refs)]
        for i, ref in enumerate(refs):
            content = others[i % len(others)]
            name = f"{fx.effect_slug(effect)}__{i}"  # a file and sample name (no '+')
            uri = os.path.join(out, "refs", f"{name}.mp4")
            write_video(uri, torch.from_numpy(ref["video"]))
            rows.append({"name": name, "effect": effect, "split": "seen" if fx.effect_split(effect) == "train" else "held-out",
                         "reference_uri": uri, "reference_prompt": ref["prompt"], "prompt": content["prompt"],
                         "shape": content["shape"], "colour": content["colour"], "background": content["background"],
                         "seed": seed * 1000 + i})
    return rows


def run_pipeline(rows: list[dict], out: str, backbone: str, checkpoint: str, batch_size: int, steps, guidance) -> dict:
    """video2lora + no_lora rows through the Ray batch pipeline (one job; strength 0 = the bare backbone)."""
    import pandas as pd

    from pipelines.batch import apply_backbone_defaults, run_batch_job
    from pipelines.common import init_ray
    from pipelines.config import BatchJobConfig
    from video2lora.config import GenerationConfig

    manifest = []
    for r in rows:
        for method, strength in (("video2lora", 1.0), ("no_lora", 0.0)):
            manifest.append({"sample_id": f"{method}__{r['name']}", "reference_uri": r["reference_uri"],
                             "prompt": r["prompt"], "seed": r["seed"], "lora_strength": strength})
    path = os.path.join(out, "manifest.parquet")
    pd.DataFrame(manifest).to_parquet(path, index=False)
    g = GenerationConfig()
    explicit = set()
    if steps:
        g.steps, explicit = steps, explicit | {"steps"}
    if guidance is not None:
        g.guidance_scale, explicit = guidance, explicit | {"guidance_scale"}
    cfg = BatchJobConfig(backbone=backbone, checkpoint=checkpoint, output=os.path.join(out, "gen"), generation=g,
                         batch_size=batch_size, hyper_batch_size=batch_size)
    cfg = apply_backbone_defaults(cfg, explicit)
    init_ray(log_to_driver=False, include_dashboard=False)
    summary = run_batch_job(path, cfg, progress=True)
    if summary["failed"]:  # a table over the rows that happened to work would mislead: stop, naming the cause
        failed = pd.read_parquet(summary["results_uri"]).query("status == 'failed'")
        raise RuntimeError(f"{len(failed)} of {summary['rows']} generation rows failed, e.g. "
                           f"{failed.sample_id.iloc[0]}: {failed.error.iloc[0]}")
    return {"summary": summary, "generation": dict(num_frames=cfg.generation.num_frames, height=cfg.generation.height,
                                                   width=cfg.generation.width, steps=cfg.generation.steps,
                                                   guidance_scale=cfg.generation.guidance_scale)}


def run_per_effect(rows: list[dict], out: str, backbone_uri: str, loras_uri: str, gen: dict, batch_size: int) -> None:
    """per_effect_lora rows through the library: the same backbone, sampler, seeds and settings."""
    from video2lora.backbones import Backbone
    from video2lora.effects.baselines import PerEffectLoRAs
    from video2lora.lightlora import inject_lightlora, per_sample_loras
    from video2lora.video_io import write_video

    loras = PerEffectLoRAs.load(loras_uri)
    backbone = Backbone.from_pretrained(backbone_uri)
    names = inject_lightlora(backbone.transformer, loras.layer_names)
    todo = [r for r in rows if r["effect"] in loras.effects]
    os.makedirs(os.path.join(out, "gen", "videos"), exist_ok=True)
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        layer_loras = loras.loras(loras.index([r["effect"] for r in chunk]), dtype=backbone.dtype)
        layer_loras = [type(l)(l.down.to(backbone.device), l.up.to(backbone.device)) for l in layer_loras]
        gens = [torch.Generator("cpu").manual_seed(int(r["seed"])) for r in chunk]
        with per_sample_loras(backbone.transformer, names, layer_loras, torch.ones(len(chunk))):
            latents = backbone.sample_latents([r["prompt"] for r in chunk], [""] * len(chunk), gens, gen["num_frames"],
                                              gen["height"], gen["width"], gen["steps"], gen["guidance_scale"])
        for r, v in zip(chunk, backbone.decode(latents).cpu()):
            write_video(os.path.join(out, "gen", "videos", f"per_effect_lora__{r['name']}.mp4"), v)
        logger.info("per-effect LoRA rows %d/%d", min(i + batch_size, len(todo)), len(todo))


# --------------------------------------------------------------------------------------------- scoring
def score(rows: list[dict], out: str, classifier_uri: str, methods) -> list[dict]:
    from video2lora.effects import judge as ec
    from video2lora.effects.world import effect_factors
    from video2lora.video_io import read_video

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
            (pred_motion, pred_look), (motion, look) = effect_factors(pred["effect"][k]), effect_factors(r["effect"])
            results.append({**r, "method": method, "video": p, "pred_effect": pred["effect"][k],
                            "pred_shape": pred["shape"][k], "pred_colour": pred["colour"][k],
                            "pred_background": pred["background"][k], "effect_ok": pred["effect"][k] == r["effect"],
                            # compounds: did the motion / the look come across, each on its own
                            "motion_ok": pred_motion == motion, "look_ok": pred_look == look,
                            "content": float(np.mean(content))})
    return results


def table(results: list[dict]) -> tuple[str, dict]:
    cells = {}
    compound = any("+" in r["effect"] for r in results)  # then also: motion and look, each on its own
    extra = " motion accuracy | look accuracy |" if compound else ""
    lines = ["| method | split | rows | effect accuracy |" + extra + " content fidelity |",
             "|---|---|---|---|" + ("---|---|" if compound else "") + "---|"]
    for method in METHODS:
        for split in ("seen", "held-out"):
            sel = [r for r in results if r["method"] == method and r["split"] == split]
            if not sel:
                continue
            acc = float(np.mean([r["effect_ok"] for r in sel]))
            content = float(np.mean([r["content"] for r in sel]))
            cell = {"rows": len(sel), "effect_accuracy": acc, "content_fidelity": content}
            row = f"| {method} | {split} | {len(sel)} | {acc:.2f} |"
            if compound:
                cell["motion_accuracy"] = float(np.mean([r["motion_ok"] for r in sel]))
                cell["look_accuracy"] = float(np.mean([r["look_ok"] for r in sel]))
                row += f" {cell['motion_accuracy']:.2f} | {cell['look_accuracy']:.2f} |"
            cells[f"{method}/{split}"] = cell
            lines.append(row + f" {content:.2f} |")
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


def contact_sheets(rows: list[dict], results: list[dict], out: str, scale: int = 3) -> list[str]:
    """One PNG per effect: for each reference, a row of its frames, then one row per method's generated frames."""
    from PIL import Image, ImageDraw

    from video2lora.video_io import read_video

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


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=ASSETS, help="trained Video2LoRA artifact (default: the bundled one)")
    p.add_argument("--backbone", default="", help="frozen backbone (default: <checkpoint>/backbone)")
    p.add_argument("--classifier", default="", help="effect classifier dir (default: <checkpoint>/classifier)")
    p.add_argument("--per-effect-loras", default="", help="baseline LoRAs (default: <checkpoint>/baselines/per_effect_loras.safetensors)")
    p.add_argument("--seed", type=int, default=7, help="draws fresh references and prompts")
    p.add_argument("--output", default="outputs/evaluate")
    p.add_argument("--refs-per-effect", type=int, default=4)
    p.add_argument("--effects", default="all",
                   help="all | train | heldout | combo | combo-train | combo-heldout | comma-separated effects")
    p.add_argument("--quick", action="store_true", help=f"CI: effects {','.join(QUICK_EFFECTS)}, one reference each")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the backbone's)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of this process")
    p.add_argument("--train-classifier", action="store_true", help="train the judge instead (see --classifier-*)")
    p.add_argument("--classifier-train", default="outputs/effects/classifier-data/clips.parquet")
    p.add_argument("--classifier-test", default="outputs/effects/classifier-test/clips.parquet")
    p.add_argument("--classifier-out", default="outputs/effects/classifier")
    p.add_argument("--classifier-epochs", type=int, default=15)
    return p.parse_args(argv)


def evaluate(a: argparse.Namespace) -> dict:
    from video2lora.effects import world as fx
    from video2lora import storage

    start = time.perf_counter()
    a.output = os.path.abspath(a.output) if "://" not in a.output else a.output  # manifest URIs are absolute
    backbone = a.backbone or storage.join(a.checkpoint, "backbone")
    classifier = a.classifier or storage.join(a.checkpoint, "classifier")
    loras = a.per_effect_loras or storage.join(a.checkpoint, "baselines", "per_effect_loras.safetensors")
    effects = list(QUICK_EFFECTS) if a.quick else fx.resolve_effects(a.effects)
    k = 1 if a.quick else a.refs_per_effect
    os.makedirs(a.output, exist_ok=True)
    rows = build_rows(a.output, a.seed, effects, k)
    logger.info("%d rows (%d effects x %d references), 3 methods", len(rows), len(effects), k)
    run = run_pipeline(rows, a.output, backbone, a.checkpoint, a.batch_size, a.steps, a.guidance_scale)
    methods = ["video2lora", "no_lora"]
    if storage.exists(loras):
        run_per_effect(rows, a.output, backbone, loras, run["generation"], a.batch_size)
        methods.append("per_effect_lora")
    else:
        logger.warning("no per-effect LoRAs at %s: that baseline is skipped", loras)
    results = score(rows, a.output, classifier, methods)
    text, cells = table(results)
    sheets = contact_sheets(rows, results, a.output)
    report = {"checkpoint": a.checkpoint, "backbone": backbone, "classifier": classifier, "seed": a.seed,
              "quick": a.quick, "effects": effects, "refs_per_effect": k, "generation": run["generation"],
              "table": cells, "rows": results, "sheets": sheets, "wall_s": time.perf_counter() - start}
    ck = storage.join(classifier, "report.json")
    if storage.exists(ck):
        report["classifier_test_accuracy"] = json.loads(storage.read_bytes(ck))["test_accuracy"]
    with open(os.path.join(a.output, "results.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    header = (f"Synthetic-effects benchmark, seed {a.seed}: {len(rows)} rows per method, "
              f"{run['generation']['steps']} steps, CFG {run['generation']['guidance_scale']}\n\n")
    with open(os.path.join(a.output, "table.md"), "w") as f:
        f.write(header + text + "\n")
    print(header + text)
    print(f"\nresults in {a.output}/results.json, contact sheets in {a.output}/sheets/ ({report['wall_s']:.0f}s)")
    return report


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.train_classifier:
        r = train_judge(a.classifier_train, a.classifier_test, a.classifier_out, a.classifier_epochs)
        print(json.dumps({"test_accuracy": r["test_accuracy"]}))
        return 0
    evaluate(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
