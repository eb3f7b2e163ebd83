"""The whole synthetic-effects recipe in one command: dataset, pretrain, judge, train, baselines, evaluate.

    python jobs/recipe.py --out outputs/effects                 # about an hour on 2 CPU cores
    python jobs/recipe.py --world combo --out outputs/combo     # compound effects ("motion+look"), below
    python jobs/recipe.py --world combo --out outputs/combo --backbone video2lora/assets/checkpoint/backbone \
        --classifier video2lora/assets/checkpoint/classifier --table-steps 6000 --ship  # shipped
    python jobs/recipe.py --world families --init-backbone video2lora/assets/checkpoint/backbone  # family points

`--backbone` / `--classifier`: a trained backbone / judge, used as it is. `--world combo`: compounds "motion+look"
("spin+fade_out"), 35 of 42 trained, 7 held out (their parts seen with other partners); `--world families`: points of
continuous families ("slide@90+hue@120"), 36 pairings trained, 13 held out (new pairings, points, a family). The
backbone and the judge learn every label of the world. Only combo ships. `--train-seed N`: another sample of a run.

Stages (each skipped when its output is already there, so a rerun resumes; `--only a,b` runs some):
1. data       jobs/make_effects.py: the hypernetwork's clips (seed 0), the judge's training (1) and test (2) clips;
2. pretrain   jobs/pretrain_backbone.py: the VAE, then the DiT + text encoder, on captioned clips of every effect;
3. judge      jobs/evaluate.py --train-classifier: the effect / content classifier on real clips;
4. prepare    jobs/prepare.py (Ray Data): every training clip through the frozen VAE and text encoder, once;
5. warmstart  jobs/pretrain_hypernet.py: one LightLoRA per training effect (or `--tables-from` an earlier run's), the
              hypernetwork regressed onto them (without it the diffusion loss ignores the reference: docs/EFFECTS.md);
6. train      jobs/train.py --init-checkpoint (Ray Train, ZeRO-2, 2 workers): the diffusion loss, as in the paper;
7. baselines  video2lora.effects.baselines: one ordinary LoRA per evaluated effect, early-stopped on its own loss;
8. select     jobs/evaluate.py on --val-seed for every checkpoint kept: the best (mean of seen and pooled held-out
              effect accuracy) becomes <out>/checkpoint (selection.md);
9. evaluate   jobs/evaluate.py on --test-seed, which no choice looked at: the table, with standard errors.
Progress lines, a banner and the wall time of every stage (also in <out>/recipe.json); numbers: docs/EFFECTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STAGES = ("data", "pretrain", "judge", "prepare", "warmstart", "train", "baselines", "select", "evaluate")
# a conv stem over the latent: the hypernetwork learns to tell effects apart about twice as fast (docs/EFFECTS.md)
HYPER_CONFIG = {"hyper": {"width": 96, "num_heads": 4, "stem_channels": 32}}
# compounds: rank 2, one rank-1 part for the motion and one for the look (the factorised warm start fills them)
COMBO_CONFIG = {**HYPER_CONFIG, "lora": {"rank": 2}}
FLAGS = ("train_parts", "motion_stream")  # one --out holds runs of one setting of each
RUN_NAME = "hypernet"  # the Ray Train run under <out>/train: its checkpoints are the select stage's candidates


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="default outputs/effects; outputs/<world> for the others")
    p.add_argument("--only", default="", help=f"comma-separated stages of {','.join(STAGES)}")
    p.add_argument("--force", action="store_true", help="redo the selected stages even if their outputs exist")
    p.add_argument("--world", choices=("single", "combo", "families"), default="single",
                   help="single effects (14, 4 held out), motion+look compounds (42, 7 held out) or family points")
    p.add_argument("--init-backbone", default="", help="continue from this pretrained backbone (its VAE kept)")
    p.add_argument("--clips-per-effect", type=int, default=60, help="hypernetwork training clips per effect")
    p.add_argument("--train-parts", action="store_true", help="combo: the hypernetwork's clips also hold each part alone")
    p.add_argument("--judge-clips", type=int, default=60, help="judge training clips per label (test: a third)")
    p.add_argument("--backbone", default="", help="use this pretrained frozen backbone as it is (no pretrain stage)")
    p.add_argument("--classifier", default="", help="use this trained judge as it is (no judge stage, no judge data)")
    p.add_argument("--pretrain-clips-per-label", type=int, default=200)
    p.add_argument("--pretrain-device", default="cpu", help="cuda: the backbone pretraining on a GPU")
    p.add_argument("--vae-minutes", type=float, default=8.0)
    p.add_argument("--dit-minutes", type=float, default=15.0)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--dit-batch", type=int, default=32)
    p.add_argument("--table-steps", type=int, default=None, help="warm start: LoRA table steps (default 800, 2000 combo)")
    p.add_argument("--regress-steps", type=int, default=1500, help="warm start: hypernetwork regression steps")
    p.add_argument("--motion-stream", action="store_true", help="compounds: HyperConfig.motion_stream")
    p.add_argument("--tables-from", default="", help="warm start: an earlier warmstart/ whose tables to take")
    p.add_argument("--reference-features", default="", help="what the hypernetwork reads of a reference "
                   "(HyperConfig.reference_features, comma-separated; default frame_norm for combo, else latent)")
    p.add_argument("--train-steps", type=int, default=None, help="end-to-end steps, batch 8 (default 1000, 2000 combo)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (select's candidates)")
    p.add_argument("--train-lr", type=float, default=1e-4)
    p.add_argument("--train-seed", type=int, default=0, help="seed of the warm start and the end-to-end run")
    p.add_argument("--baseline-steps", type=int, default=4000, help="per-effect LoRAs: at most (each early-stops)")
    p.add_argument("--baseline-rank", type=int, default=4)
    p.add_argument("--val-seed", type=int, default=101, help="select: checkpoints are compared on this seed's rows")
    p.add_argument("--test-seed", "--eval-seed", dest="test_seed", type=int, default=202, help="evaluate: the table's seed")
    p.add_argument("--refs-per-effect", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: OpenMP spinning costs)")
    p.add_argument("--ship", action="store_true", help="copy checkpoint + backbone + judge + baselines into video2lora/assets")
    return p.parse_args(argv)


def run(cmd: list[str], env=None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **(env or {})})


def world_labels(a) -> tuple[str, str, str]:
    """(the hypernetwork's effects, every label of the world, the evaluated effects): effect set names or lists."""
    from video2lora.effects.world import ALL_LABELS

    if a.world == "single":
        return "all", ",".join(ALL_LABELS), "all"
    # the hypernetwork's data holds every evaluated effect (and, --train-parts, the compounds' parts alone)
    return "combo-with-parts" if a.train_parts else a.world, f"{a.world}-world", f"{a.world}-eval"


def stage_data(a, paths) -> None:
    effects, labels, _ = world_labels(a)
    sets = [("data", 0, a.clips_per_effect, effects)]
    if not a.classifier:  # a trained judge given needs no clips
        sets += [("judge_train", 1, a.judge_clips, labels), ("judge_test", 2, max(1, a.judge_clips // 3), labels)]
    for name, seed, clips, which in sets:  # the parts alone train (zoom_out alone is held out in the single world)
        parts = ["--train-labels", "combo-parts"] if a.train_parts and name == "data" else []
        run([sys.executable, "jobs/make_effects.py", "--out", paths[name], "--seed", str(seed), "--clips-per-effect",
             str(clips), "--effects", which] + parts)


def stage_pretrain(a, paths) -> None:
    cmd = [sys.executable, "jobs/pretrain_backbone.py", "--out", paths["backbone"], "--device", a.pretrain_device,
           "--clips-per-label", str(a.pretrain_clips_per_label), "--dit-steps", "100000", "--dit-minutes",
           str(a.dit_minutes), "--dit-batch", str(a.dit_batch), "--threads", str(a.threads), "--force"]
    if a.world != "single":
        cmd += ["--effects", world_labels(a)[1]]
    if a.init_backbone:  # continue from a pretrained backbone, its VAE kept: the DiT learns the new labels
        cmd += ["--init", a.init_backbone, "--vae-steps", "0", "--dit-lr", "3e-4"]
    else:
        cmd += ["--vae-steps", "100000", "--vae-minutes", str(a.vae_minutes), "--vae-batch", str(a.vae_batch)]
    run(cmd)


def stage_judge(a, paths) -> None:
    run([sys.executable, "jobs/evaluate.py", "--train-classifier", "--classifier-train", f"{paths['judge_train']}/clips.parquet",
         "--classifier-test", f"{paths['judge_test']}/clips.parquet", "--classifier-out", paths["classifier"],
         "--threads", str(a.threads)])


def _env() -> dict:
    return {"PYTHONPATH": os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH", "")) if x)}


def stage_prepare(a, paths) -> None:
    run([sys.executable, "jobs/prepare.py", "--ray-address", "local", "--manifest",
         os.path.join(paths["data"], "clips.parquet"), "--backbone", paths["backbone"], "--output",
         os.path.join(paths["train"], "prepared")], env=_env())


def reference_features(a) -> list[str]:
    """--reference-features as names (default frame_norm for --world combo, where it was measured; else latent)."""
    from video2lora.config import HyperConfig
    names = [n.strip() for n in (a.reference_features or ("frame_norm" if a.world == "combo" else "latent")).split(",")]
    try:
        return list(HyperConfig(reference_features=names).reference_features)
    except ValueError as e:
        raise ValueError(f"--reference-features {a.reference_features!r}: {e}") from None


def stage_warmstart(a, paths) -> None:
    combo = a.world != "single"  # compounds: a factorised warm start
    table_steps = a.table_steps if a.table_steps is not None else (2000 if combo else 800)  # 35-36 compounds share them
    config = json.loads(json.dumps(COMBO_CONFIG if combo else HYPER_CONFIG))
    config["hyper"].update(reference_features=reference_features(a), motion_stream=a.motion_stream)
    run([sys.executable, "jobs/pretrain_hypernet.py", "--prepared", prepared_dir(paths), "--backbone",
         paths["backbone"], "--output", paths["warmstart"], "--model-config", json.dumps(config),
         "--table-steps", str(table_steps), "--regress-steps", str(a.regress_steps), "--seed", str(a.train_seed),
         # one process alone on the machine: up to 2 threads pay off here even where the Ray stages use 1
         "--threads", str(max(a.threads, min(2, os.cpu_count() or 1)))] + (["--factorise"] if combo else [])
        + (["--tables-from", os.path.abspath(a.tables_from)] if a.tables_from else []), env=_env())


def stage_train(a, paths) -> None:
    steps = a.train_steps if a.train_steps is not None else (1000 if a.world == "single" else 2000)
    run([sys.executable, "jobs/train.py", "--ray-address", "local", "--manifest",
         os.path.join(paths["data"], "clips.parquet"), "--backbone", paths["backbone"], "--storage-path",
         paths["train"], "--name", RUN_NAME, "--prepared", prepared_dir(paths), "--output", paths["final"],
         "--init-checkpoint", paths["warmstart"], "--num-workers", "2", "--max-steps", str(steps), "--seed",
         str(a.train_seed), "--batch-size", "4", "--lr", str(a.train_lr), "--grad-clip", "1.0", "--mixed-precision", "fp32",
         # every checkpoint is kept: the select stage compares them on the validation seed
         "--checkpoint-every", str(a.checkpoint_every), "--keep-checkpoints", str(-(-steps // a.checkpoint_every)),
         # 2 CPUs: 2 workers x 0.25 + their data readers must fit, or the readers wait forever
         "--log-every", "50", "--cpus-per-worker", "0.25", "--data-cpus", "0.1"], env=_env())


def finished_preparations(paths) -> list[str]:
    root = os.path.join(paths["train"], "prepared")
    names = os.listdir(root) if os.path.isdir(root) else []
    return [os.path.join(root, d) for d in names if os.path.exists(os.path.join(root, d, "prepared.json"))]


def prepared_dir(paths) -> str:
    done = finished_preparations(paths)  # the newest finished one is the prepare stage's output
    if not done:
        raise FileNotFoundError(f"no finished preparation under {paths['train']}/prepared: run the prepare stage first")
    return max(done, key=os.path.getmtime)


def stage_baselines(a, paths) -> None:
    import torch

    from video2lora.backbones import Backbone
    from video2lora.effects.baselines import train_per_effect_loras
    from video2lora.effects.world import resolve_effects
    from video2lora.hypernet import Video2LoRAModel
    from video2lora.training import PreparedData

    torch.set_num_threads(a.threads)
    data = PreparedData.load(prepared_dir(paths), split="all")
    backbone = Backbone.from_pretrained(paths["backbone"], device="cpu")
    targets = backbone.lora_targets  # the layers the hypernetwork adapts (its checkpoint says which, if there)
    if os.path.exists(os.path.join(paths["final"], "config.json")):
        targets = Video2LoRAModel.from_pretrained(paths["final"]).config.lora.target_modules
    effects = resolve_effects(world_labels(a)[2])  # the evaluated ones (all single effects; some compounds)
    # each effect its own budget: trained until its loss on clips held out of its training stops falling
    model, report = train_per_effect_loras(backbone, data, effects=effects, target_modules=targets,
                                           rank=a.baseline_rank, steps=a.baseline_steps, batch_size=14, seed=0,
                                           early_stopping=True)
    os.makedirs(os.path.dirname(paths["baselines"]), exist_ok=True)
    model.save(paths["baselines"])
    with open(paths["baselines"] + ".json", "w") as f:
        json.dump({"rank": a.baseline_rank, "max_steps": a.baseline_steps, **report}, f, indent=2)


def candidates(paths) -> list[tuple[int, str]]:
    """(step, model dir) of every checkpoint the train stage kept, oldest first."""
    root = os.path.join(paths["train"], RUN_NAME)
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    found = [(int(d.split("-")[1]), os.path.join(root, d, "model")) for d in names
             if d.startswith("checkpoint-") and os.path.exists(os.path.join(root, d, "model", "config.json"))]
    if not found:
        raise FileNotFoundError(f"no checkpoint under {root}: run the train stage first")
    return found


def stage_select(a, paths) -> None:
    """Every kept checkpoint on the validation seed (never the test seed); the best (ties: fewer steps) ships."""
    from video2lora.effects.evaluation import ROW_PROTOCOL, selection_markdown, selection_score
    from video2lora.effects.world import resolve_effects

    rows, best, evaluated = [], None, resolve_effects(world_labels(a)[2])
    for step, model in candidates(paths):
        out = os.path.join(paths["select"], f"seed-{a.val_seed}", f"step-{step}")
        done = os.path.join(out, "results.json")
        earlier = json.load(open(done)) if os.path.exists(done) else {}  # reused if it scored this very checkpoint
        same = [earlier.get(k) for k in ("checkpoint", "refs_per_effect", "effects", "row_protocol")] == [
            model, a.refs_per_effect, evaluated, ROW_PROTOCOL] and earlier.get("references_per_row", 1) == 1
        if earlier and (a.force or not same):
            shutil.rmtree(out)
        if not os.path.exists(done):
            run(evaluate_command(a, paths, model, a.val_seed, out) + ["--no-per-effect"])
        with open(done) as f:
            cells = json.load(f)["table"]
        rows.append({"step": step, "model": model, "score": selection_score(cells), "table": cells})
        if best is None or rows[-1]["score"] > best["score"]:
            best = rows[-1]
    shutil.rmtree(paths["checkpoint"], ignore_errors=True)
    shutil.copytree(best["model"], paths["checkpoint"])
    text = selection_markdown([(r["step"], r["table"]) for r in rows], best["step"], a.val_seed, a.refs_per_effect)
    with open(os.path.join(paths["select"], "selection.md"), "w") as f:
        f.write(text)
    with open(os.path.join(paths["select"], "selection.json"), "w") as f:
        json.dump({"val_seed": a.val_seed, "chosen_step": best["step"],
                   "candidates": [{k: r[k] for k in ("step", "score", "table")} for r in rows]}, f, indent=2)
    print(text, flush=True)


def evaluate_command(a, paths, checkpoint, seed, out) -> list[str]:
    """jobs/evaluate.py on `seed`'s rows of the evaluated effects, the paper's sampler exactly (no step cache)."""
    return [sys.executable, "jobs/evaluate.py", "--checkpoint", checkpoint, "--backbone", paths["backbone"],
            "--classifier", paths["classifier"], "--seed", str(seed), "--refs-per-effect", str(a.refs_per_effect),
            "--output", out, "--threads", str(a.threads), "--step-cache", "none", "--effects", world_labels(a)[2]]


def stage_evaluate(a, paths) -> None:
    run(evaluate_command(a, paths, paths["checkpoint"], a.test_seed, paths["evaluate"])
        + ["--per-effect-loras", paths["baselines"]])


DONE = {  # (args, paths) -> whether the stage's output is already there
    "data": lambda a, p: os.path.exists(os.path.join(p["data"], "clips.parquet")) and (
        bool(a.classifier) or os.path.exists(os.path.join(p["judge_test"], "clips.parquet"))),
    "pretrain": lambda a, p: os.path.exists(os.path.join(p["backbone"], "pretrain_report.json")),
    "judge": lambda a, p: os.path.exists(os.path.join(p["classifier"], "report.json")),
    "prepare": lambda a, p: bool(finished_preparations(p)),
    "warmstart": lambda a, p: os.path.exists(os.path.join(p["warmstart"], "warmstart.json")),
    "train": lambda a, p: os.path.exists(os.path.join(p["final"], "config.json")),
    "baselines": lambda a, p: os.path.exists(p["baselines"]),
    "select": lambda a, p: os.path.exists(os.path.join(p["select"], "selection.json")),
    "evaluate": lambda a, p: os.path.exists(os.path.join(p["evaluate"], "table.md")),
}


def ship(paths) -> None:
    """Copy the trained artifact, its frozen backbone, the judge and the baselines into video2lora/assets. Built
    beside the old assets and swapped in at the end: a given --backbone / --classifier may be the shipped one."""
    dst = os.path.join(ROOT, "video2lora", "assets", "checkpoint")
    new = dst + ".new"
    shutil.rmtree(new, ignore_errors=True)
    os.makedirs(new)
    for name in ("config.json", "video2lora.safetensors"):
        shutil.copy(os.path.join(paths["checkpoint"], name), new)
    shutil.copytree(paths["backbone"], os.path.join(new, "backbone"))
    os.makedirs(os.path.join(new, "classifier"))
    for name in ("config.json", "model.safetensors", "report.json"):
        shutil.copy(os.path.join(paths["classifier"], name), os.path.join(new, "classifier"))
    os.makedirs(os.path.join(new, "baselines"))
    shutil.copy(paths["baselines"], os.path.join(new, "baselines"))
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(new, dst)
    print(f"shipped into {dst}")


def refusal(a, paths, out, only, recorded) -> str:
    """Why this run cannot start ("" when it can), before any stage runs."""
    if unknown := [s for s in only if s not in STAGES]:
        return f"unknown stage(s) {unknown}; stages: {list(STAGES)}"
    if a.ship and a.world != "combo":  # the tests and the batch job's default evaluate the compound world's labels
        return f"--ship: only --world combo ships (video2lora/assets); --world {a.world} stays in --out"
    if a.train_parts and a.world != "combo":
        return f"--train-parts: the parts of --world combo's compounds; --world {a.world} has none"
    if a.motion_stream and a.world == "single":
        return "--motion-stream: the motion half of a compound's factorised LoRA; --world single has no compounds"
    if a.backbone and a.init_backbone:
        return "--backbone (use one as it is) and --init-backbone (pretrain from one) exclude each other"
    for flag, given, marker in (("--backbone", a.backbone, "model_index.json"), ("--classifier", a.classifier, "config.json")):
        if given and not os.path.exists(os.path.join(given, marker)):
            return f"{flag} {given}: no {marker} there"
    if a.init_backbone and os.path.abspath(a.init_backbone) == paths["backbone"]:
        return (f"--init-backbone {a.init_backbone} is this run's own backbone (--out {out}): the pretrain stage "
                "would skip or overwrite its own starting point; give a run of another --out")
    try:
        a.reference_features = ",".join(reference_features(a))  # recorded in recipe.json as used
    except ValueError as e:
        return str(e)
    if os.path.exists(recorded):  # stages are skipped when their outputs exist: never mix two runs in one --out
        with open(recorded) as f:
            before = json.load(f).get("args", {})
        if before.get("world", "single") != a.world:
            return f"{out} holds a --world {before.get('world', 'single')} run; give another --out for --world {a.world}"
        # runs from before --train-parts / --motion-stream had neither
        was = [before.get("reference_features") or a.reference_features, before.get("train_seed", 0)]
        was += [bool(before.get(k)) for k in FLAGS]
        now = [a.reference_features, a.train_seed] + [getattr(a, k) for k in FLAGS]
        said = lambda v: f"reading {v[0]}, --train-seed {v[1]}, " + ", ".join(  # noqa: E731
            f"{'with' if on else 'without'} --{k.replace('_', '-')}" for k, on in zip(FLAGS, v[2:]))
        if was != now:
            return f"{out} holds a run {said(was)} (this run: {said(now)}); give another --out"
    return ""


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    a = parse_args(argv)
    out = os.path.abspath(a.out or ("outputs/effects" if a.world == "single" else f"outputs/{a.world}"))
    paths = {"data": f"{out}/data", "judge_train": f"{out}/classifier-data", "judge_test": f"{out}/classifier-test",
             "backbone": f"{out}/backbone", "classifier": f"{out}/classifier", "train": f"{out}/train",
             "checkpoint": f"{out}/checkpoint", "final": f"{out}/train/final", "warmstart": f"{out}/warmstart",
             "baselines": f"{out}/baselines/per_effect_loras.safetensors", "select": f"{out}/select",
             "evaluate": f"{out}/evaluate"}
    for name in ("backbone", "classifier"):  # given: used as it is, never rewritten (its stage is skipped below)
        paths[name] = os.path.abspath(getattr(a, name)) if getattr(a, name) else paths[name]
    only = [s.strip() for s in a.only.split(",") if s.strip()] or list(STAGES)
    recorded = os.path.join(out, "recipe.json")
    if error := refusal(a, paths, out, only, recorded):
        print(f"error: {error}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    timings, start = {}, time.perf_counter()
    for k, name in enumerate(STAGES):
        if name not in only:
            continue
        if (name == "pretrain" and a.backbone) or (name == "judge" and a.classifier):
            print(f"== [{k + 1}/{len(STAGES)}] {name}: given ({paths['backbone' if name == 'pretrain' else 'classifier']})")
            continue
        if DONE[name](a, paths) and not a.force:
            print(f"== [{k + 1}/{len(STAGES)}] {name}: done earlier, skipped", flush=True)
            continue
        print(f"== [{k + 1}/{len(STAGES)}] {name} (recipe at {(time.perf_counter() - start) / 60:.1f} min)", flush=True)
        t = time.perf_counter()
        globals()[f"stage_{name}"](a, paths)
        timings[name] = time.perf_counter() - t
        print(f"== {name} finished in {timings[name] / 60:.1f} min", flush=True)
    total = time.perf_counter() - start
    if os.path.exists(recorded):  # a resumed run keeps the wall times of the stages it skipped
        with open(recorded) as f:
            timings = {**json.load(f).get("stage_seconds", {}), **timings}
    with open(recorded, "w") as f:
        json.dump({"stage_seconds": timings, "total_seconds": sum(timings.values()), "args": vars(a), "paths": paths},
                  f, indent=2)
    print("stage wall times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) +
          f"; this run {total / 60:.1f} min")
    if os.path.exists(os.path.join(paths["evaluate"], "table.md")):
        print(open(os.path.join(paths["evaluate"], "table.md")).read())
    if a.ship:
        ship(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
