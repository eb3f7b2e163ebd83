"""Evaluate the output-space oracle tables (fit.py) on one seed's rows: each row's LoRA is its compound's table."""
import json, os, sys
import torch
from safetensors.torch import load_file
from video2lora.config import GenerationConfig
from video2lora.effects import world as fx
from video2lora.effects.evaluation import build_rows, score, table
from video2lora.generate import GenerationRequest, Video2LoRAGenerator
from video2lora.predict import PredictedLoRA
from video2lora.video_io import write_video

torch.set_num_threads(1)
seed, out, tables, ckpt = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
backbone = os.path.join(ckpt, "backbone")
defaults = json.load(open(os.path.join(backbone, "generation_defaults.json")))
cfg = GenerationConfig(step_cache="none", **{k: v for k, v in defaults.items() if hasattr(GenerationConfig, k)})
rows = build_rows(out, seed, fx.resolve_effects("combo-eval"), 8)
tab = load_file(os.path.join(tables, "oracle_tables.safetensors"))
groups = json.load(open(os.path.join(tables, "oracle_tables.json")))["groups"]
gen = Video2LoRAGenerator.from_pretrained(backbone, ckpt, cfg)
os.makedirs(os.path.join(out, "gen", "videos"), exist_ok=True)
for i in range(0, len(rows), 8):
    chunk = rows[i:i + 8]
    reqs = [GenerationRequest(r["prompt"], lora=PredictedLoRA(tab["a_pred"][groups.index(r["effect"])],
            tab["b_pred"][groups.index(r["effect"])]), negative_prompt="", seed=r["seed"]) for r in chunk]
    for r, v in zip(chunk, gen.generate(reqs)):
        write_video(os.path.join(out, "gen", "videos", f"oracle_output_space__{r['name']}.mp4"), v)
    print("rows", i + len(chunk), flush=True)
results = score(rows, out, os.path.join(ckpt, "classifier"), ["oracle_output_space"])
text, cells = table(results)
json.dump({"seed": seed, "table": cells, "rows": results}, open(os.path.join(out, "results.json"), "w"), default=str, indent=1)
open(os.path.join(out, "table.md"), "w").write(text)
print(text)
