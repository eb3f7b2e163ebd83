import sys, os, shutil, torch
from safetensors.torch import load_file, save_file
root = "/work/runs/combo-bb2/train/hypernet"
steps = [int(s) for s in sys.argv[2].split(",")]
out = sys.argv[1]
sds = [load_file(f"{root}/checkpoint-{s:09d}/model/video2lora.safetensors") for s in steps]
avg = {k: (sum(sd[k].double() for sd in sds) / len(sds)).to(sds[0][k].dtype) for k in sds[0]}
os.makedirs(out, exist_ok=True)
shutil.copy(f"{root}/checkpoint-{steps[0]:09d}/model/config.json", out)
save_file(avg, f"{out}/video2lora.safetensors")
print(len(avg), "tensors averaged over", steps)
