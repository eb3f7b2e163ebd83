"""Tiny seeded backbones for CPU tests and the embedded default. Saved as real diffusers pipeline
directories, so every caller loads them through the same `from_pretrained` path as real weights."""

from __future__ import annotations

import string

import torch

WORDS = (
    "a an the of on in with and at over under near small large big tiny "
    "red green blue yellow purple orange white black gray grey cyan pink brown dark light bright "
    "circle square triangle ring cross star shape disk box dot line stripe "
    "background scene frame video clip moving slowly quickly left right up down center corner "
    "cat dog person car tree house water sky fire smoke flower bird ball "
    # appended for the effects world's captions (video2lora.effects); only ever append, never reorder
    "diamond maroon night gradient dusk"
).split()


def tiny_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -2.0) for w in dict.fromkeys(WORDS)]
    vocab += [(c, -6.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5(tokenizer, d_model: int, d_kv: int, d_ff: int, num_heads: int):
    """A 2-layer T5 encoder over the offline tokenizer (CogVideoX's text encoder, at toy size)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=2, num_heads=num_heads,
                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    )


def tiny_cogvideox_vae(block_out_channels: tuple, latent_channels: int, temporal_compression: int, **extra):
    """The CogVideoX VAE at toy size: 4x spatial compression (3 blocks), 32x32 samples."""
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        block_out_channels=block_out_channels,
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=temporal_compression,
        sample_height=32,
        sample_width=32,
        **extra,
    )


def cogvideox_scheduler():
    """The released CogVideoX checkpoints' sampler: DDIM, v-prediction, zero-terminal SNR, trailing spacing."""
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        timestep_spacing="trailing", snr_shift_scale=1.0,
    )


def tiny_cogvideox(i2v: bool = False, seed: int = 0, latent_channels: int = 4, text_len: int = 16):
    """A CogVideoX pipeline with the real architecture at toy size: VAE 4x spatial / 4x temporal,
    patch 2, so a 32x32 9-frame clip is 3 latent frames of 8x8 and 48 tokens."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_t5(tokenizer, d_model=32, d_kv=16, d_ff=64, num_heads=2)
    vae = tiny_cogvideox_vae((16, 32, 32), latent_channels, temporal_compression=4)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=latent_channels * (2 if i2v else 1),
        out_channels=latent_channels,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=text_len,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=i2v,
    )
    scheduler = cogvideox_scheduler()
    cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    return cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def effects_cogvideox(seed: int = 0, latent_channels: int = 8, temporal_compression: int = 1):
    """A CogVideoX T2V pipeline sized to *learn* the procedural effects world (video2lora.effects) on CPU.

    32x32 clips of 9 frames. VAE: 4x spatial and, by default, no temporal compression (the CogVideoX VAE
    averages frame pairs when it compresses time, which smears frame-level effects such as flicker and shake),
    so a clip is 9 latent frames of 8x8x8; DiT: patch 2 -> 16 tokens per frame, 144 video tokens, 6 blocks of
    width 128 (about 3 M parameters). Text: a tiny T5 over the offline tokenizer (every caption word is a
    token). Random weights encode nothing: `video2lora.pretrain` trains the VAE, then the DiT (and text
    encoder) before the backbone is frozen; see docs/EFFECTS.md."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_t5(tokenizer, d_model=64, d_kv=16, d_ff=128, num_heads=4)
    # scaling_factor is set from the trained encoder's latent statistics by video2lora.pretrain
    vae = tiny_cogvideox_vae((16, 32, 32), latent_channels, temporal_compression, scaling_factor=1.0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=latent_channels,
        out_channels=latent_channels,
        time_embed_dim=128,
        text_embed_dim=64,
        num_layers=6,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=temporal_compression,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=True,
    )
    scheduler = cogvideox_scheduler()
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler)


PRESETS = {
    "tiny-cogvideox": lambda seed=0: tiny_cogvideox(i2v=False, seed=seed),
    "tiny-cogvideox-i2v": lambda seed=0: tiny_cogvideox(i2v=True, seed=seed),
    "effects-cogvideox": lambda seed=0: effects_cogvideox(seed=seed),
    "tiny-wan": lambda seed=0: __import__("video2lora.wan", fromlist=["tiny_wan"]).tiny_wan(seed=seed),
}


def save_tiny(preset: str, directory: str, seed: int = 0) -> str:
    """Build a tiny preset with a fixed seed and save it as a diffusers pipeline directory."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    PRESETS[preset](seed=seed).save_pretrained(directory, safe_serialization=True)
    write_generation_defaults(directory, TINY_GENERATION)
    return directory


# what the tiny models make by default (a backbone dir may carry generation_defaults.json)
TINY_GENERATION = {"num_frames": 9, "height": 32, "width": 32, "steps": 10, "guidance_scale": 6.0}
DEFAULTS_NAME = "generation_defaults.json"


def write_generation_defaults(directory: str, values: dict) -> None:
    import json
    import os

    with open(os.path.join(directory, DEFAULTS_NAME), "w") as f:
        json.dump(values, f, indent=2)
