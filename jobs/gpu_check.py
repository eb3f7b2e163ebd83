"""Full-size check on one GPU: CogVideoX-5b (I2V config) with random weights in bf16.

Measures what only a real GPU can show: DiT step time and peak memory with and without per-sample
LightLoRAs (every row its own LoRA, CFG batch), hypernetwork cost per reference, a training step
(gradients into hypernetwork + aux only), VAE encode/decode with tiling. No weights are downloaded.

    python jobs/gpu_check.py --out gpu_check.json          # on a GPU node
    python jobs/gpu_check.py --tiny                         # smoke test of this script on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from video2lora.presets import get_preset  # noqa: E402


def timed(fn, device, warmup=1, iters=3):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return (time.perf_counter() - start) / iters, peak, out


def rope(cfg, frames, h, w, device):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = cfg["patch_size"]
    gh, gw = h // p, w // p
    crops = get_resize_crop_region_for_grid((gh, gw), cfg["sample_width"] // p, cfg["sample_height"] // p)
    return get_3d_rotary_pos_embed(cfg["attention_head_dim"], crops, (gh, gw), frames, device=device)


def main(argv=None):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    from video2lora.config import Video2LoRAConfig
    from video2lora.hypernet import Video2LoRAModel
    from video2lora.lightlora import (checkpoint_with_loras, find_target_modules, inject_lightlora, per_sample_loras,
                                      remove_lightlora)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch-sizes", default="1,4", help="videos per call; CFG doubles the DiT batch")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--skip-vae", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = get_preset("tiny-cogvideox-i2v" if args.tiny else "cogvideox-5b").transformer
    frames, h, w = (3, 8, 8) if args.tiny else (13, 60, 90)  # latent grid of 49 frames at 480x720
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "config": "tiny" if args.tiny else "CogVideoX-5b-I2V", "latent_grid": [frames, h, w]}

    start = time.perf_counter()
    with torch.device(device):
        dit = CogVideoXTransformer3DModel(**cfg).to(dtype).eval().requires_grad_(False)
    report["dit_params_b"] = sum(p.numel() for p in dit.parameters()) / 1e9
    report["dit_build_s"] = time.perf_counter() - start
    names = find_target_modules(dit, Video2LoRAConfig().lora.target_modules)
    layers = [(n, dit.get_submodule(n).in_features, dit.get_submodule(n).out_features) for n in names]
    torch.manual_seed(0)
    model = Video2LoRAModel(Video2LoRAConfig(layers=layers, latent_channels=cfg["out_channels"])).to(device)
    report["adapted_layers"] = len(layers)
    report["artifact_params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    rot = rope(cfg, frames, h, w, device)  # h, w: the latent grid
    rot = tuple(r.to(device) for r in rot)
    lc = model.config.lora

    def inputs(rows):
        g = torch.Generator(device).manual_seed(1)
        hs = torch.randn(rows, frames, cfg["in_channels"], h, w, generator=g, device=device, dtype=dtype)
        text = torch.randn(rows, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=g, device=device, dtype=dtype)
        return hs, text, torch.full((rows,), 500, device=device)

    report["steps"] = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        hs, text, t = inputs(2 * b)  # CFG: [uncond, cond] of b videos

        def step():
            with torch.no_grad():
                return dit(hidden_states=hs, encoder_hidden_states=text, timestep=t, image_rotary_emb=rot, return_dict=False)[0]

        bare_s, bare_mem, bare_out = timed(step, device)
        inject_lightlora(dit, lc.target_modules)
        a = torch.randn(b, len(layers), lc.rank, lc.down, device=device) * 0.02
        bp = torch.randn(b, len(layers), lc.up, lc.rank, device=device) * 0.02
        start = time.perf_counter()
        with torch.no_grad():
            loras = [type(l)(l.down.to(dtype), l.up.to(dtype)) for l in model.materialize(a, bp)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        materialize_s = time.perf_counter() - start
        with per_sample_loras(dit, names, loras, torch.ones(b, device=device)):
            lora_s, lora_mem, lora_out = timed(step, device)
        with per_sample_loras(dit, names, loras, torch.zeros(b, device=device)):
            _, _, zero_out = timed(step, device, warmup=0, iters=1)
        remove_lightlora(dit)
        row = {"videos": b, "dit_batch": 2 * b, "bare_step_s": bare_s, "lora_step_s": lora_s,
               "lora_time_overhead": lora_s / bare_s - 1, "bare_peak_gib": bare_mem, "lora_peak_gib": lora_mem,
               "lora_mem_overhead": (lora_mem / bare_mem - 1) if bare_mem else 0.0, "materialize_s": materialize_s,
               "lora_changes_output": float((lora_out - bare_out).abs().max()),
               "strength0_equals_bare": bool(torch.equal(zero_out, bare_out))}
        report["steps"].append(row)
        print(json.dumps(row), flush=True)

    # hypernetwork: one batch of reference latents (49 frames at 480x720 -> 16 x 13 x 60 x 90)
    refs = torch.randn(8, cfg["out_channels"], frames, h, w, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        hyper_s, hyper_mem, _ = timed(lambda: model.predict(refs), device)
    report["hypernet_s_per_reference"] = hyper_s / 8
    report["hypernet_peak_gib_batch8"] = hyper_mem
    report["hypernet_vs_50_step_generation"] = (hyper_s / 8) / (50 * report["steps"][0]["lora_step_s"])

    # a training step: frozen bf16 DiT, fp32 master weights, bf16 compute, grads into hypernet + aux only
    inject_lightlora(dit, lc.target_modules)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.03)
    hs, text, t = inputs(1)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loras = model(refs[:1])
            loras = [type(l)(l.down.to(dtype), l.up.to(dtype)) for l in loras]
            with per_sample_loras(dit, names, loras, torch.ones(1, device=device)):
                pred = dit(hidden_states=hs, encoder_hidden_states=text, timestep=t, image_rotary_emb=rot, return_dict=False)[0]
        loss = pred.float().pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        return loss

    # with and without activation checkpointing of the DiT blocks (the LoRAs kept through the recomputation)
    for checkpointing in (False, True):
        key = "train_checkpointed" if checkpointing else "train"
        if checkpointing:
            dit.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_loras)
        try:
            train_s, train_mem, _ = timed(train_step, device, warmup=1, iters=2)
            report[f"{key}_step_s"], report[f"{key}_peak_gib"] = train_s, train_mem
        except torch.OutOfMemoryError:
            report[f"{key}_step_s"] = report[f"{key}_peak_gib"] = "out of memory"
            torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in report.items() if k.startswith(key)}), flush=True)
    dit.disable_gradient_checkpointing()
    report["dit_grads_none"] = all(p.grad is None for p in dit.parameters())
    remove_lightlora(dit)
    del dit, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.skip_vae:
        vae_kwargs = {} if not args.tiny else dict(block_out_channels=(16, 32, 32), down_block_types=("CogVideoXDownBlock3D",) * 3,
                                                  up_block_types=("CogVideoXUpBlock3D",) * 3, latent_channels=4,
                                                  layers_per_block=1, norm_num_groups=4)
        with torch.device(device):
            vae = AutoencoderKLCogVideoX(**vae_kwargs).to(dtype).eval()
        vae.enable_tiling()
        px = torch.rand(1, 3, 49 if not args.tiny else 9, 480 if not args.tiny else 32, 720 if not args.tiny else 32,
                        device=device, dtype=dtype) * 2 - 1
        with torch.no_grad():
            enc_s, enc_mem, lat = timed(lambda: vae.encode(px).latent_dist.mode(), device, warmup=0, iters=1)
            dec_s, dec_mem, _ = timed(lambda: vae.decode(lat).sample, device, warmup=0, iters=1)
        report.update(vae_encode_s=enc_s, vae_encode_peak_gib=enc_mem, vae_decode_s=dec_s, vae_decode_peak_gib=dec_mem)

    print(json.dumps(report, indent=2))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
