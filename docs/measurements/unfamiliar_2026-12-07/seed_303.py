"""Tables of the rule's own runs on fresh seed 303 (jobs/evaluate.py with --refine-steps 80
--refine-steps-unfamiliar 160): effect accuracy and content fidelity against no LoRA on the same rows, the fits the
batch job recorded (results.parquet `reference_fit`), the step count each reference got, and the refinement time;
for burst also paired against the fixed 80-step run of the same rows.

    python docs/measurements/unfamiliar_2026-12-07/seed_303.py OUT   # OUT holds comp303, burst303, burst303-k80
"""
import json, os, sys

import numpy as np
import pandas as pd

out = sys.argv[1]


def ms(x, digits=2):
    x = np.asarray(x, float)
    return f"{x.mean():+.{digits}f} ± {x.std(ddof=1) / np.sqrt(len(x)):.{digits}f}"


def acc(x):
    x = np.asarray(x, float)
    return f"{x.mean():.2f} ± {x.std(ddof=1) / np.sqrt(len(x)):.2f}"


def load(run):
    res = json.load(open(os.path.join(out, run, "results.json")))
    gen = pd.read_parquet(os.path.join(out, run, "gen", "results.parquet")).set_index("sample_id")
    rows = {}
    for r in res["rows"]:
        rows.setdefault(r["name"], {})[r["method"]] = r
    for name, rs in rows.items():
        g = gen.loc[f"video2lora__{name}"]
        rs["fit"], rs["t_refine_s"] = float(g["reference_fit"]), float(g["t_refine_s"])
    return res, rows


print("| seed 303 | rows | share fit > 1 (160 steps) | video2lora, rule | no LoRA | paired − no LoRA | content, paired − no LoRA | refinement s / reference, median |")
print("|---|---|---|---|---|---|---|---|")
runs = {}
for run, splits in (("comp303", ("seen", "held-out")), ("burst303", ("held-out",))):
    if not os.path.exists(os.path.join(out, run, "results.json")):
        continue
    res, rows = load(run)
    runs[run] = rows
    assert res["refine"]["refine_steps_unfamiliar"] == 160 and res["refine"]["refine_steps"] == 80, res["refine"]
    for split in splits:
        rs = [v for v in rows.values() if v["video2lora"]["split"] == split]
        fits = np.array([v["fit"] for v in rs])
        ok = [float(v["video2lora"]["effect_ok"]) for v in rs]
        bare = [float(v["no_lora"]["effect_ok"]) for v in rs]
        content = [v["video2lora"]["content"] - v["no_lora"]["content"] for v in rs]
        label = "burst" if run.startswith("burst") else f"compounds, {split}"
        print(f"| {label} | {len(rs)} | {np.mean(fits > 1):.2f} | {acc(ok)} | {acc(bare)} | {ms(np.subtract(ok, bare))} "
              f"| {ms(content, 3)} | {np.median([v['t_refine_s'] for v in rs]):.1f} |")
if os.path.exists(os.path.join(out, "burst303-k80", "results.json")):
    _, fixed = load("burst303-k80")
    names = sorted(runs["burst303"])
    rule = [float(runs["burst303"][n]["video2lora"]["effect_ok"]) for n in names]
    k80 = [float(fixed[n]["video2lora"]["effect_ok"]) for n in names]
    c_rule = [runs["burst303"][n]["video2lora"]["content"] for n in names]
    c_k80 = [fixed[n]["video2lora"]["content"] for n in names]
    same_bare = np.mean([runs["burst303"][n]["no_lora"]["effect_ok"] == fixed[n]["no_lora"]["effect_ok"] for n in names])
    print(f"\nburst, the rule − refined 80 steps everywhere (paired, {len(names)} rows): effect {ms(np.subtract(rule, k80))}, "
          f"content {ms(np.subtract(c_rule, c_k80), 3)}; refined 80 steps alone: {acc(k80)}; "
          f"no-LoRA rows agreeing between the two runs: {same_bare:.2f}")
    runs["burst303-k80"] = fixed
if os.path.exists(os.path.join(out, "comp303-zs", "results.json")):  # zero-shot, per-effect and no LoRA, same rows
    res = json.load(open(os.path.join(out, "comp303-zs", "results.json")))
    other = {}
    for r in res["rows"]:
        other.setdefault(r["name"], {})[r["method"]] = r
    runs["comp303-zs"] = other
    print("\n| compounds, seed 303 | seen | held-out |")
    print("|---|---|---|")
    rule = runs["comp303"]
    split = lambda s: sorted(n for n in rule if rule[n]["video2lora"]["split"] == s)  # noqa: E731
    ok = lambda rows, n, m: float(rows[n][m]["effect_ok"])  # noqa: E731
    for label, rows, m in (("refined, the rule", rule, "video2lora"), ("zero-shot", other, "video2lora"),
                           ("per-effect LoRA", other, "per_effect_lora"), ("no LoRA", other, "no_lora")):
        print(f"| {label} | " + " | ".join(acc([ok(rows, n, m) for n in split(s)]) for s in ("seen", "held-out")) + " |")
    for label, m in (("refined − zero-shot, paired", "video2lora"), ("refined − per-effect, paired", "per_effect_lora")):
        print(f"| {label} | " + " | ".join(ms([ok(rule, n, "video2lora") - ok(other, n, m) for n in split(s)])
                                            for s in ("seen", "held-out")) + " |")
    print("| content, refined − no LoRA (same run) | " + " | ".join(
        ms([rule[n]["video2lora"]["content"] - rule[n]["no_lora"]["content"] for n in split(s)], 3) for s in ("seen", "held-out")) + " |")
    print("| content, zero-shot − no LoRA | " + " | ".join(
        ms([other[n]["video2lora"]["content"] - other[n]["no_lora"]["content"] for n in split(s)], 3) for s in ("seen", "held-out")) + " |")
keep = ("name", "effect", "split", "prompt", "reference_prompt", "seed", "pred_effect", "effect_ok", "motion_ok",
        "look_ok", "content")
json.dump({run: {name: {"reference_fit": rs.get("fit"), "t_refine_s": rs.get("t_refine_s"),
                        **{m: {k: r.get(k) for k in keep} for m, r in rs.items() if isinstance(r, dict)}}
                 for name, rs in rows.items()} for run, rows in runs.items()},
          open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "seed_303_rows.json"), "w"), indent=1)
