"""Per split: mean ± SE of the oracle and of each evaluate.py method on the same rows, and paired differences."""
import json, sys
import numpy as np
orc = {r["name"]: r for r in json.load(open(sys.argv[1]))["rows"]}
ev = json.load(open(sys.argv[2]))["rows"]
F = ("effect_ok", "motion_ok", "look_ok", "content")
def ms(d): d = np.asarray(d, float); return f"{d.mean():.2f} ± {d.std(ddof=1)/np.sqrt(len(d)):.2f}"
def pd(d): d = np.asarray(d, float); return f"{d.mean():+.2f} ± {d.std(ddof=1)/np.sqrt(len(d)):.2f}"
print("| LoRA | split | effect | motion | look | content |\n|---|---|---|---|---|---|")
for split in ("seen", "held-out"):
    names = [n for n, r in orc.items() if r["split"] == split]
    print(f"| output-space oracle | {split} | " + " | ".join(ms([float(orc[n][f]) for n in names]) for f in F) + " |")
    for m in ("video2lora", "per_effect_lora", "no_lora"):
        other = {r["name"]: r for r in ev if r["method"] == m}
        print(f"| {m} | {split} | " + " | ".join(ms([float(other[n][f]) for n in names]) for f in F) + " |")
print("\n| paired | split | effect | motion | look | content |\n|---|---|---|---|---|---|")
for split in ("seen", "held-out"):
    names = [n for n, r in orc.items() if r["split"] == split]
    for m in ("video2lora", "per_effect_lora", "no_lora"):
        other = {r["name"]: r for r in ev if r["method"] == m}
        assert all(other[n]["seed"] == orc[n]["seed"] and other[n]["prompt"] == orc[n]["prompt"] for n in names)
        print(f"| oracle − {m} | {split} | " + " | ".join(pd([float(orc[n][f]) - float(other[n][f]) for n in names]) for f in F) + " |")
