"""Tables from reference_fits.json: how the reference fit separates references (diagnostic), and the rule "refine
80 steps, 160 where the fit is above tau" evaluated on the rows of the fixed 80- and 160-step runs. Each row's
refinement and video depend only on its own reference, caption and seed, so the rule's video for a row is the
80- or 160-step run's video of that row (the rule's own run on fresh seed 303 checks the implemented path).

    python docs/measurements/unfamiliar_2026-12-07/policy_tables.py > docs/measurements/unfamiliar_2026-12-07/tables.md
"""
import json, os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
d = json.load(open(os.path.join(HERE, "reference_fits.json")))


def ms(x):
    x = np.asarray(x, float)
    return f"{x.mean():.2f} ± {x.std(ddof=1) / np.sqrt(len(x)):.2f}"


def ms3(x):
    x = np.asarray(x, float)
    return f"{x.mean():+.3f} ± {x.std(ddof=1) / np.sqrt(len(x)):.3f}"


print("## The reference fit of the shipped checkpoint's predictions\n")
print("| seed | references | n | median fit [10th, 90th percentile] | share above 1 | zero-shot accuracy, fit <= 1 / > 1 |")
print("|---|---|---|---|---|---|")
for key, rows in d.items():
    kind, seed = key.split("_")
    for split in ("seen", "held-out"):
        rs = [r for r in rows if r["split"] == split]
        if not rs:
            continue
        f = np.array([r["fit"] for r in rs])
        zs = "—"
        if "zs" in rs[0]:
            lo = [r["zs"]["ok"] for r in rs if r["fit"] <= 1]
            hi = [r["zs"]["ok"] for r in rs if r["fit"] > 1]
            zs = f"{np.mean(lo):.2f} (n={len(lo)}) / " + (f"{np.mean(hi):.2f} (n={len(hi)})" if hi else "— (n=0)")
        name = "burst (a kind never trained on)" if kind == "burst" else f"compounds, {split}"
        print(f"| {seed} | {name} | {len(rs)} | {np.median(f):.2f} [{np.percentile(f, 10):.2f}, {np.percentile(f, 90):.2f}] "
              f"| {np.mean(f > 1):.2f} | {zs} |")


print("\nCompounds, zero-shot effect accuracy of rows below / above their split's median fit:\n")
print("| seed | seen: below / above | held-out: below / above |")
print("|---|---|---|")
for seed in ("val101", "test202"):
    cells = []
    for split in ("seen", "held-out"):
        rs = [r for r in d[f"compound_{seed}"] if r["split"] == split]
        med = np.median([r["fit"] for r in rs])
        cells.append(ms([r["zs"]["ok"] for r in rs if r["fit"] <= med]) + " / " + ms([r["zs"]["ok"] for r in rs if r["fit"] > med]))
    print(f"| {seed} | " + " | ".join(cells) + " |")


print("\nA zero-shot job's flag (fit above 1), test seed 202, compounds and burst together:\n")
rows = d["compound_test202"] + d["burst_test202"]
for flagged in (True, False):
    rs = [r for r in rows if (r["fit"] > 1) == flagged]
    kinds = sum(r["effect"] == "burst" for r in rs)
    print(f"- {'fit above 1' if flagged else 'fit at most 1'}: {len(rs)} references ({kinds} burst), zero-shot effect "
          f"accuracy {ms([r['zs']['ok'] for r in rs])}")


def rule(rows, tau):
    return [r["k160"] if r["fit"] > tau else r["k80"] for r in rows]


for seed in ("val101", "test202"):
    comp, burst = d[f"compound_{seed}"], d[f"burst_{seed}"]
    seen = [r for r in comp if r["split"] == "seen"]
    held = [r for r in comp if r["split"] == "held-out"]
    print(f"\n## Refine 80 steps, 160 above tau: seed {seed}\n")
    print("| tau | compounds seen | held-out | score (mean) | burst | mean steps: compounds / burst | content − no LoRA: held-out / burst |")
    print("|---|---|---|---|---|---|---|")
    for tau in (0.8, 0.9, 1.0, 1.1, 1.2, 1.3, float("inf")):
        s, h, b = rule(seen, tau), rule(held, tau), rule(burst, tau)
        score = (np.mean([x["ok"] for x in s]) + np.mean([x["ok"] for x in h])) / 2
        steps = [np.mean([160 if r["fit"] > tau else 80 for r in rs]) for rs in (comp, burst)]
        ch = [x["content"] - r["no_lora"]["content"] for x, r in zip(h, held)]
        cb = [x["content"] - r["no_lora"]["content"] for x, r in zip(b, burst)]
        label = "inf (80 everywhere)" if tau == float("inf") else f"{tau}"
        print(f"| {label} | {ms([x['ok'] for x in s])} | {ms([x['ok'] for x in h])} | {score:.3f} | {ms([x['ok'] for x in b])} "
              f"| {steps[0]:.0f} / {steps[1]:.0f} | {ms3(ch)} / {ms3(cb)} |")
    print("| 0 (160 everywhere) | " + " | ".join(ms([r["k160"]["ok"] for r in rs]) for rs in (seen, held)) + " | "
          f"{(np.mean([r['k160']['ok'] for r in seen]) + np.mean([r['k160']['ok'] for r in held])) / 2:.3f} | "
          f"{ms([r['k160']['ok'] for r in burst])} | 160 / 160 | "
          f"{ms3([r['k160']['content'] - r['no_lora']['content'] for r in held])} / "
          f"{ms3([r['k160']['content'] - r['no_lora']['content'] for r in burst])} |")
    print("\nPaired per row, the rule at tau = 1 minus:\n")
    print("| against | compounds seen | held-out | burst |")
    print("|---|---|---|---|")
    for other in ("k80", "k160", "no_lora"):
        cells = [ms([x["ok"] - r[other]["ok"] for x, r in zip(rule(rs, 1.0), rs)]) for rs in (seen, held, burst)]
        print(f"| {dict(k80='refined 80 steps', k160='refined 160 steps', no_lora='no LoRA')[other]} | " + " | ".join(cells) + " |")
