"""Paired per row: video2lora rows of run A minus run B (same row names), per split. usage: paired2.py A.json B.json"""
import json, sys, numpy as np
def rows(p): return {x["name"]: x for x in json.load(open(p))["rows"] if x["method"] == "video2lora"}
a, b = rows(sys.argv[1]), rows(sys.argv[2])
print("| split | rows | effect | motion | look | content |"); print("|---|---|---|---|---|---|")
for sp in ("seen", "held-out", "held-out family"):
    names = [n for n in a if a[n]["split"] == sp and n in b]
    if not names: continue
    assert all(a[n]["seed"] == b[n]["seed"] and a[n]["prompt"] == b[n]["prompt"] for n in names)
    cells = []
    for k in ("effect_ok", "motion_ok", "look_ok", "content"):
        d = np.array([float(a[n][k]) - float(b[n][k]) for n in names])
        cells.append(f"{d.mean():+.3f} ± {d.std(ddof=1)/np.sqrt(len(d)):.3f}")
    print(f"| {sp} | {len(names)} | " + " | ".join(cells) + " |")
