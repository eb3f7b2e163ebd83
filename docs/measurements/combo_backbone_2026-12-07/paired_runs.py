"""Paired per row, run A minus run B (same row names, seeds and prompts), for each method and split.

    python paired_runs.py A/results.json B/results.json   # or the *_rows.json lists of docs/measurements
"""
import json
import sys

import numpy as np


def rows(path):
    data = json.load(open(path))
    return {(x["method"], x["name"]): x for x in (data["rows"] if isinstance(data, dict) else data)}


a, b = rows(sys.argv[1]), rows(sys.argv[2])
print("| method | split | rows | effect | motion | look | content |")
print("|---|---|---|---|---|---|---|")
for method in ("video2lora", "no_lora", "per_effect_lora"):
    for split in ("seen", "held-out"):
        keys = [k for k in a if k[0] == method and a[k]["split"] == split and k in b]
        if not keys:
            continue
        assert all(a[k]["seed"] == b[k]["seed"] and a[k]["prompt"] == b[k]["prompt"] for k in keys)
        cells = []
        for field in ("effect_ok", "motion_ok", "look_ok", "content"):
            d = np.array([float(a[k][field]) - float(b[k][field]) for k in keys])
            cells.append(f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)):.3f}")
        print(f"| {method} | {split} | {len(keys)} | " + " | ".join(cells) + " |")
