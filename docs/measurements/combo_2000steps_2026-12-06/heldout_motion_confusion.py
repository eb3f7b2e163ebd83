"""Which motion the judge sees in each held-out compound's generated videos (video2lora rows).
usage: python heldout_motion_confusion.py RESULTS.json [RESULTS.json ...]"""
import collections, json, sys

from video2lora.effects.world import effect_factors

for path in sys.argv[1:]:
    data = json.load(open(path))
    rows = [r for r in (data["rows"] if isinstance(data, dict) else data)
            if r["method"] == "video2lora" and r["split"] == "held-out"]
    by = collections.defaultdict(collections.Counter)
    for r in rows:
        by[r["effect"]][effect_factors(r["pred_effect"])[0]] += 1
    print(f"{path}\n\n| held-out compound | motions the judge sees in its 8 videos |\n|---|---|")
    for effect, seen in by.items():
        print(f"| {effect} | " + ", ".join(f"{m} {n}" for m, n in seen.most_common()) + " |")
    print()
