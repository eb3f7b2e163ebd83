"""Helpers shared by several test files (imported by name; pytest puts tests/ on the path)."""

import torch

from video2lora.effects import world as fx


def in_memory_data(backbone, labels, clips_per_label=2):
    """A PreparedData held in memory (what jobs/prepare.py writes, without Ray or files)."""
    from video2lora.training import PreparedData

    index, cache = [], {}
    for label in labels:
        for rec in fx.make_dataset(3, clips_per_label, effects=[label]):
            i = len(index)
            index.append({"clip_id": rec["clip_id"], "effect": label, "split": fx.effect_split(label)})
            with torch.no_grad():
                cache[i] = {"latents": backbone.encode_video(torch.from_numpy(rec["video"])[None])[0],
                            "prompt_embeds": backbone.encode_prompts([rec["prompt"]])[0]}
    empty = backbone.encode_prompts([""])[0]
    return PreparedData(uri="memory", info={}, index=index, empty_prompt=empty, _cache=cache)
