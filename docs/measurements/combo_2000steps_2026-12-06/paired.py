import json, sys, numpy as np
r = json.load(open(sys.argv[1]))["rows"]
by = {}
for x in r: by[(x["method"], x["name"])] = x
splits = [s for s in ("seen", "held-out", "held-out family") if any(x["split"] == s for x in r)]
print("| comparison (same rows) | split | rows | effect | motion | look | content |")
print("|---|---|---|---|---|---|---|")
for other in ("no_lora", "per_effect_lora"):
    for sp in splits:
        names = [x["name"] for x in r if x["method"] == "video2lora" and x["split"] == sp and (other, x["name"]) in by]
        if not names: continue
        cells = []
        for k in ("effect_ok", "motion_ok", "look_ok", "content"):
            d = np.array([float(by[("video2lora", n)][k]) - float(by[(other, n)][k]) for n in names])
            cells.append(f"{d.mean():+.3f} ± {d.std(ddof=1)/np.sqrt(len(d)):.3f}")
        print(f"| video2lora − {other} | {sp} | {len(names)} | " + " | ".join(cells) + " |")
