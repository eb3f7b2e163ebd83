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
import dataclasses
import json
import logging
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pipelines.config import add_refine_args, add_step_cost_args, refine_overrides, step_cost_overrides  # noqa: E402
from video2lora.effects.evaluation import (  # noqa: E402
    QUICK_EFFECTS, ROW_PROTOCOL, SPLITS, build_rows, contact_sheets, mean_se, score, table, train_judge)

logger = logging.getLogger("evaluate")

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "video2lora", "assets", "checkpoint")


# --------------------------------------------------------------------------------------------- generation
def manifest_rows(rows: list[dict], lora_strength: float = 1.0) -> list[dict]:
    """The batch job's manifest: per row a video2lora sample and a no_lora one (strength 0, the bare backbone). A row
    of several references mixes their LoRAs with equal weights (`reference_uris`); its no_lora sample reads only
    the first, since at strength 0 no LoRA is applied."""
    manifest = []
    for r in rows:
        mixed = len(r.get("reference_uris", [])) > 1
        for method, strength in (("video2lora", lora_strength), ("no_lora", 0.0)):
            source = ({"reference_uris": r["reference_uris"]} if mixed and method == "video2lora"
                      else {"reference_uri": r["reference_uri"]})
            manifest.append({"sample_id": f"{method}__{r['name']}", **source, "prompt": r["prompt"],
                             "reference_prompt": r.get("reference_prompt", ""),  # what a refined LoRA is refined with
                             "seed": r["seed"], "lora_strength": strength})
    return manifest


def signed_generation(g: GenerationConfig) -> dict:
    """The generation settings an evaluation's videos depend on, in the form evaluations signed before the later
    settings existed: measuring the fit changes no video; refinement counts only when on, its unfamiliar step count
    only when set."""
    generation = dataclasses.asdict(g)
    generation.pop("measure_reference_fit")
    if generation["refine_steps_unfamiliar"] is None:
        generation.pop("refine_steps_unfamiliar")
    if not g.refine_steps:
        generation = {k: v for k, v in generation.items() if not k.startswith("refine")}
    return generation


def run_pipeline(rows: list[dict], out: str, backbone: str, checkpoint: str, batch_size: int, steps, guidance,
                 step_cost: dict | None = None, lora_strength: float = 1.0) -> dict:
    """video2lora + no_lora rows through the Ray batch pipeline (one job; strength 0 = the bare backbone)."""
    import pandas as pd

    from pipelines.batch import apply_backbone_defaults, run_batch_job
    from pipelines.common import init_ray
    from pipelines.config import BatchJobConfig
    from video2lora.backbones.step_cost import resolved
    from video2lora.config import GenerationConfig

    manifest = manifest_rows(rows, lora_strength)
    path = os.path.join(out, "manifest.parquet")
    g = GenerationConfig(**(step_cost or {}))
    explicit = set()
    if steps:
        g.steps, explicit = steps, explicit | {"steps"}
    if guidance is not None:
        g.guidance_scale, explicit = guidance, explicit | {"guidance_scale"}
    cfg = BatchJobConfig(backbone=backbone, checkpoint=checkpoint, output=os.path.join(out, "gen"), generation=g,
                         batch_size=batch_size, hyper_batch_size=batch_size,
                         redo_changed=True)  # gen/ is this evaluation's own: a row made otherwise is made again
    cfg = apply_backbone_defaults(cfg, explicit)
    # the batch job resumes by sample id: videos made for other rows (another seed, effect set or row protocol) or
    # by another model or sampler would be taken as done under the same names. They belong to that earlier
    # evaluation and are made again
    generation = signed_generation(resolved(cfg.generation))
    signed_rows = manifest
    if not cfg.generation.refine_steps:  # without refinement, the signature evaluations had before it existed
        signed_rows = [{k: v for k, v in r.items() if k != "reference_prompt"} for r in manifest]
    signature = json.dumps({"rows": signed_rows, "checkpoint": checkpoint, "backbone": backbone,
                            "generation": generation}, sort_keys=True, default=str)
    signed = os.path.join(out, "gen_signature.json")
    earlier = None
    if os.path.exists(signed):
        with open(signed) as f:
            earlier = f.read()
    if os.path.exists(os.path.join(out, "gen")) and earlier != signature:
        logger.warning("%s holds an evaluation of other rows, model or sampler: its videos are made again", out)
        shutil.rmtree(os.path.join(out, "gen"))
    pd.DataFrame(manifest).to_parquet(path, index=False)
    with open(signed, "w") as f:
        f.write(signature)
    init_ray(log_to_driver=False, include_dashboard=False)
    summary = run_batch_job(path, cfg, progress=True)
    if summary["failed"]:  # a table over the rows that happened to work would mislead: stop, naming the cause
        failed = pd.read_parquet(summary["results_uri"]).query("status == 'failed'")
        raise RuntimeError(f"{len(failed)} of {summary['rows']} generation rows failed, e.g. "
                           f"{failed.sample_id.iloc[0]}: {failed.error.iloc[0]}")
    return {"summary": summary, "generation": dict(num_frames=cfg.generation.num_frames, height=cfg.generation.height,
                                                   width=cfg.generation.width, steps=cfg.generation.steps,
                                                   guidance_scale=cfg.generation.guidance_scale),
            "step_cost": {k: v for k, v in dataclasses.asdict(resolved(cfg.generation)).items()
                          if k.startswith(("step_cache", "compile", "fuse"))},
            "refine": {k: v for k, v in dataclasses.asdict(cfg.generation).items() if k.startswith("refine")}}


def run_per_effect(rows: list[dict], out: str, backbone_uri: str, loras_uri: str, gen: dict, batch_size: int,
                   step_cost: dict, lora_strength: float = 1.0) -> None:
    """per_effect_lora rows through the library's generator: the same backbone, sampler (step cache included),
    seeds and settings as the other methods' rows."""
    from video2lora.config import GenerationConfig
    from video2lora.effects.baselines import PerEffectLoRAs
    from video2lora.generate import GenerationRequest, Video2LoRAGenerator
    from video2lora.video_io import write_video

    loras = PerEffectLoRAs.load(loras_uri)
    generator = Video2LoRAGenerator.from_pretrained(backbone_uri, None, GenerationConfig(**step_cost))
    if generator.adapted_layers(loras.layer_names) != loras.layer_names:
        raise ValueError(f"the per-effect LoRAs at {loras_uri} adapt layers this backbone does not have in that order")
    todo = [r for r in rows if r["effect"] in loras.effects]
    os.makedirs(os.path.join(out, "gen", "videos"), exist_ok=True)
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        requests = [GenerationRequest(r["prompt"], negative_prompt="", seed=r["seed"], lora_strength=lora_strength)
                    for r in chunk]
        layer_loras = loras.loras(loras.index([r["effect"] for r in chunk]))
        for r, v in zip(chunk, generator.generate(requests, layer_loras=layer_loras, **gen)):
            write_video(os.path.join(out, "gen", "videos", f"per_effect_lora__{r['name']}.mp4"), v)
        logger.info("per-effect LoRA rows %d/%d", min(i + batch_size, len(todo)), len(todo))


def check_against(against: str, references_per_row: int) -> None:
    """Before any work: an --against run made with another number of references per row has other rows."""
    with open(os.path.join(against, "results.json")) as f:
        theirs = json.load(f).get("references_per_row", 1)
    if theirs != references_per_row:
        raise ValueError(f"--against {against}: made with {theirs} references per row, this run "
                         f"{references_per_row}: its rows are not these rows")


def psnr_against(results: list[dict], out: str, against: str, gen: dict) -> dict:
    """Per method: mean and standard error of the PSNR (dB, frames in [-1, 1]) of each row's video against the
    same file in `against` (a row whose two videos are identical counts as 100 dB, so the mean stays finite)."""
    from video2lora.effects.evaluation import psnr
    from video2lora.video_io import read_video

    by: dict[str, list[float]] = {}
    for r in results:
        name = f"{r['method']}__{r['name']}.mp4"
        mine, theirs = os.path.join(out, "gen", "videos", name), os.path.join(against, "gen", "videos", name)
        if not os.path.exists(theirs):
            raise FileNotFoundError(f"--against {against}: no {name} there (run it with the same --seed and --effects)")
        size = (gen["num_frames"], gen["height"], gen["width"])
        by.setdefault(r["method"], []).append(psnr(read_video(mine, *size), read_video(theirs, *size)))
    out = {}
    for m, x in by.items():
        mean, se = mean_se(x)
        out[m] = {"rows": len(x), "psnr_db": mean, "psnr_db_se": se}
    # paired differences (this run minus that one, the same rows): far tighter than comparing two tables' SEs
    with open(os.path.join(against, "results.json")) as f:
        theirs = {(r["method"], r["name"]): r for r in json.load(f)["rows"]}
    for m in out:
        for split in SPLITS:
            sel = [r for r in results if r["method"] == m and r["split"] == split and (m, r["name"]) in theirs]
            for field, key in (("effect_ok", "effect_accuracy"), ("content", "content_fidelity")):
                if sel:
                    d = [float(r[field]) - float(theirs[(m, r["name"])][field]) for r in sel]
                    out[m][f"{split}_{key}_diff"], out[m][f"{split}_{key}_diff_se"] = mean_se(d)
    return out


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
    p.add_argument("--references-per-row", type=int, default=1,
                   help="clips of the effect per row, their LoRAs mixed with equal weights (the batch job's "
                        "reference_uris); 1 = the paper's single reference (--quick too honours it)")
    p.add_argument("--effects", default="all",
                   help="all | train | heldout | combo-eval | families-eval | any set of video2lora.effects.labels | "
                        "comma-separated effects")
    p.add_argument("--quick", action="store_true", help=f"CI: effects {','.join(QUICK_EFFECTS)}, one reference each")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the backbone's)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--lora-strength", type=float, default=1.0,
                   help="scale of the video2lora and per-effect LoRAs (1: as trained; no_lora rows stay at 0)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-per-effect", action="store_true", help="skip the per-effect LoRA baseline")
    p.add_argument("--against", default="", help="an earlier evaluation's output dir (same seed and effects): PSNR "
                   "of every generated video against the same row's video there, e.g. an uncached run")
    add_step_cost_args(p, cache_default="none")
    add_refine_args(p)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of this process")
    p.add_argument("--train-classifier", action="store_true", help="train the judge instead (see --classifier-*)")
    p.add_argument("--classifier-train", default="outputs/effects/classifier-data/clips.parquet")
    p.add_argument("--classifier-test", default="outputs/effects/classifier-test/clips.parquet")
    p.add_argument("--classifier-out", default="outputs/effects/classifier")
    p.add_argument("--classifier-epochs", type=int, default=15)
    a = p.parse_args(argv)
    from pipelines.manifest import MAX_REFERENCES
    if not 1 <= a.references_per_row <= MAX_REFERENCES:
        p.error(f"--references-per-row {a.references_per_row}: a mix takes 1 to {MAX_REFERENCES} references")
    if a.refine_steps and a.references_per_row > 1:
        p.error("--refine-steps refines the LoRA of one reference: use it with --references-per-row 1")
    return a


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
    if a.against:
        check_against(a.against, a.references_per_row)
    os.makedirs(a.output, exist_ok=True)
    rows = build_rows(a.output, a.seed, effects, k, a.references_per_row)
    logger.info("%d rows (%d effects x %d references, %d clips each), 3 methods", len(rows), len(effects), k,
                a.references_per_row)
    run = run_pipeline(rows, a.output, backbone, a.checkpoint, a.batch_size, a.steps, a.guidance_scale,
                       {"step_cache": "none", **step_cost_overrides(a), **refine_overrides(a)},  # paper's sampler unless asked
                       lora_strength=a.lora_strength)
    methods = ["video2lora", "no_lora"]
    if a.no_per_effect:
        logger.info("per-effect LoRA baseline skipped (--no-per-effect)")
    elif storage.exists(loras):
        run_per_effect(rows, a.output, backbone, loras, run["generation"], a.batch_size, run["step_cost"],
                       a.lora_strength)
        methods.append("per_effect_lora")
    else:
        logger.warning("no per-effect LoRAs at %s: that baseline is skipped", loras)
    results = score(rows, a.output, classifier, methods)
    text, cells = table(results)
    if a.against:
        psnr = psnr_against(results, a.output, a.against, run["generation"])
        splits = [sp for sp in SPLITS if any(r["split"] == sp for r in results)]
        text += ("\n\nAgainst " + a.against + " (same rows, seeds): PSNR, and this run minus that one per row (paired)\n\n"
                 f"| method | rows | PSNR dB (mean ± SE) | effect accuracy, {' / '.join(splits)} | content fidelity, "
                 f"{' / '.join(splits)} |\n|---|---|---|---|---|\n")

        def diff(c, key):
            return " / ".join(f"{c[f'{sp}_{key}_diff']:+.3f} ± {c[f'{sp}_{key}_diff_se']:.3f}" if f"{sp}_{key}_diff" in c
                              else "-" for sp in splits)
        text += "\n".join(f"| {m} | {c['rows']} | {c['psnr_db']:.1f} ± {c['psnr_db_se']:.1f} | "
                          f"{diff(c, 'effect_accuracy')} | {diff(c, 'content_fidelity')} |" for m, c in psnr.items())
        for m, c in psnr.items():
            cells[f"{m}/psnr_against"] = c
    sheets = contact_sheets(rows, results, a.output)
    report = {"checkpoint": a.checkpoint, "backbone": backbone, "classifier": classifier, "seed": a.seed,
              "quick": a.quick, "effects": effects, "step_cost": run["step_cost"], "against": a.against, "refs_per_effect": k,
              "references_per_row": a.references_per_row, "row_protocol": ROW_PROTOCOL,
              "lora_strength": a.lora_strength, "generation": run["generation"], "refine": run["refine"],
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
