"""Per split: run A's method minus run B's method, paired per row (same row names, seeds and prompts).

    python paired_methods.py A/results.json video2lora B/results.json per_effect_lora
(A and B: an evaluate stage's results.json or one of this folder's *.json.)"""
import json
import sys

import numpy as np


def rows(path, method):
    data = json.load(open(path))
    return {x["name"]: x for x in (data["rows"] if isinstance(data, dict) else data) if x["method"] == method}


a, b = rows(sys.argv[1], sys.argv[2]), rows(sys.argv[3], sys.argv[4])
print(f"{sys.argv[2]} ({sys.argv[1]}) minus {sys.argv[4]} ({sys.argv[3]})\n")
print("| split | rows | effect | motion | look | content |\n|---|---|---|---|---|---|")
for split in ("seen", "held-out", "held-out family"):
    names = [n for n in a if a[n]["split"] == split and n in b]
    if not names:
        continue
    assert all(a[n]["seed"] == b[n]["seed"] and a[n]["prompt"] == b[n]["prompt"] for n in names)
    cells = []
    for field in ("effect_ok", "motion_ok", "look_ok", "content"):
        d = np.array([float(a[n][field]) - float(b[n][field]) for n in names])
        cells.append(f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)):.3f}")
    print(f"| {split} | {len(names)} | " + " | ".join(cells) + " |")
