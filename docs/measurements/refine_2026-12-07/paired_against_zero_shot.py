import json, sys, numpy as np
new = {r["name"]: r for r in json.load(open(sys.argv[1]))["rows"]}
base = json.load(open(sys.argv[2]))["rows"]
F = ("effect_ok", "motion_ok", "look_ok", "content")
def ms(d): d = np.asarray(d, float); return f"{d.mean():.2f} ± {d.std(ddof=1)/np.sqrt(len(d)):.2f}"
def pd(d): d = np.asarray(d, float); return f"{d.mean():+.3f} ± {d.std(ddof=1)/np.sqrt(len(d)):.3f}"
for split in ("seen", "held-out"):
    names = [n for n, r in new.items() if r["split"] == split]
    print(split, "refined", " | ".join(ms([float(new[n][f]) for n in names]) for f in F))
    for m in ("video2lora", "per_effect_lora", "no_lora"):
        o = {r["name"]: r for r in base if r["method"] == m}
        print(f"   minus {m}", " | ".join(pd([float(new[n][f]) - float(o[n][f]) for n in names]) for f in F))
