"""Diagnostic: the hypernetwork's own output space as an oracle. One (A_pred, B_pred) per evaluated compound (seen
and held-out), fitted with the diffusion loss on that compound's clips, the shipped checkpoint's aux matrices
frozen: the best LoRA the hypernetwork could predict for each compound if it recognised it perfectly."""
import json, sys, time, torch
from safetensors.torch import save_file
from video2lora.backbones import Backbone
from video2lora.effects.world import resolve_effects
from video2lora.hypernet import Video2LoRAModel
from video2lora.training import PreparedData
from video2lora.training.data import stack_examples, step_seed
from video2lora.training.loss import batch_loss, prepare_backbone, prompt_dropout

ckpt, prepared, out = sys.argv[1], sys.argv[2], sys.argv[3]
steps, rank_mult = int(sys.argv[4]), 1
torch.set_num_threads(1)
torch.manual_seed(0)
model = Video2LoRAModel.from_pretrained(ckpt)
backbone = Backbone.from_pretrained(ckpt + "/backbone", device="cpu")
data = PreparedData.load(prepared, split="all")
groups = list(resolve_effects("combo-eval"))
rows = [i for i, e in enumerate(data.effects) if e in groups]
print(len(rows), "clips of", len(groups), "compounds", flush=True)
prepare_backbone(backbone, model)
model.train()
for p in model.parameters():
    p.requires_grad_(False)
lc, L = model.config.lora, len(model.config.layers)
g = torch.Generator().manual_seed(0)
a_tab = torch.nn.Parameter(torch.randn(len(groups), L, lc.rank, lc.down, generator=g) / lc.down**0.5)
b_tab = torch.nn.Parameter(torch.zeros(len(groups), L, lc.up, lc.rank))
opt = torch.optim.AdamW([a_tab, b_tab], lr=2e-3, weight_decay=0.0)
t0, recent, hist = time.perf_counter(), [], []
for step in range(1, steps + 1):
    pick = [rows[j] for j in torch.randint(0, len(rows), (8,), generator=g).tolist()]
    batch = stack_examples([data.example(i) for i in pick])
    gen = torch.Generator().manual_seed(step_seed(0, step, 0))
    batch["prompt_embeds"], _ = prompt_dropout(batch["prompt_embeds"], data.empty_prompt, 0.1, gen)
    idx = torch.tensor([groups.index(data.effects[i]) for i in pick])
    loss = batch_loss(model, backbone, batch, gen, model.materialize(a_tab[idx], b_tab[idx]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([a_tab, b_tab], 1.0)
    opt.step()
    recent.append(float(loss))
    if step % 100 == 0 or step == steps:
        hist.append({"step": step, "loss": sum(recent) / len(recent), "time_s": time.perf_counter() - t0})
        print(hist[-1], flush=True)
        recent = []
save_file({"a_pred": a_tab.detach().contiguous(), "b_pred": b_tab.detach().contiguous()}, out + "/oracle_tables.safetensors")
json.dump({"groups": groups, "steps": steps, "history": hist}, open(out + "/oracle_tables.json", "w"), indent=1)
