"""Paired per row, run A minus run B (same row names, seeds and prompts), for each method and split.

    python paired_runs.py A/results.json B/results.json                     # every method both runs have
    python paired_runs.py A/results.json B/results.json --method video2lora  # one method: no method column
(A and B: an evaluate stage's results.json or a *_rows.json list of docs/measurements.)
"""
import argparse
import json

import numpy as np

METHODS = ("video2lora", "no_lora", "per_effect_lora")
SPLITS = ("seen", "held-out", "held-out family")


def rows(path):
    data = json.load(open(path))
    return {(x["method"], x["name"]): x for x in (data["rows"] if isinstance(data, dict) else data)}


parser = argparse.ArgumentParser()
parser.add_argument("a")
parser.add_argument("b")
parser.add_argument("--method", choices=METHODS)
args = parser.parse_args()
a, b = rows(args.a), rows(args.b)
one = args.method is not None
print(("" if one else "| method ") + "| split | rows | effect | motion | look | content |")
print(("" if one else "|---") + "|---|---|---|---|---|---|")
for method in (args.method,) if one else METHODS:
    for split in SPLITS:
        keys = [k for k in a if k[0] == method and a[k]["split"] == split and k in b]
        if not keys:
            continue
        assert all(a[k]["seed"] == b[k]["seed"] and a[k]["prompt"] == b[k]["prompt"] for k in keys)
        cells = []
        for field in ("effect_ok", "motion_ok", "look_ok", "content"):
            d = np.array([float(a[k][field]) - float(b[k][field]) for k in keys])
            cells.append(f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)):.3f}")
        print(("" if one else f"| {method} ") + f"| {split} | {len(keys)} | " + " | ".join(cells) + " |")
