"""One registry of named model presets, each with its generation defaults (as torchtitan's config registry).

Seeded presets (`tiny-*`, `effects-cogvideox`, `small-cogvideox`) are built here and saved as real diffusers
pipeline directories, so every caller loads them through the same `from_pretrained` path as real weights.
Published presets (`cogvideox-5b`, ...) name the released checkpoint and carry its transformer dimensions, for
size reports and random-weight checks on the meta device or a GPU; their weights are never downloaded here.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from typing import Callable

import torch

DEFAULTS_NAME = "generation_defaults.json"  # a backbone dir may carry the generation settings it was made for

WORDS = (
    "a an the of on in with and at over under near small large big tiny "
    "red green blue yellow purple orange white black gray grey cyan pink brown dark light bright "
    "circle square triangle ring cross star shape disk box dot line stripe "
    "background scene frame video clip moving slowly quickly left right up down center corner "
    "cat dog person car tree house water sky fire smoke flower bird ball "
    # appended for the effects world's captions (video2lora.effects.world); only ever append, never reorder
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


def tiny_cogvideox_transformer(i2v: bool = False, latent_channels: int = 4, text_len: int = 16) -> dict:
    """The tiny CogVideoX DiT's config (2 blocks of width 32)."""
    return dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=latent_channels * (2 if i2v else 1),
        out_channels=latent_channels, time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=8,
        sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=text_len,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=i2v,
    )


def tiny_cogvideox(i2v: bool = False, seed: int = 0, latent_channels: int = 4, text_len: int = 16):
    """A CogVideoX pipeline with the real architecture at toy size: VAE 4x spatial / 4x temporal,
    patch 2, so a 32x32 9-frame clip is 3 latent frames of 8x8 and 48 tokens."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_t5(tokenizer, d_model=32, d_kv=16, d_ff=64, num_heads=2)
    vae = tiny_cogvideox_vae((16, 32, 32), latent_channels, temporal_compression=4)
    transformer = CogVideoXTransformer3DModel(**tiny_cogvideox_transformer(i2v, latent_channels, text_len))
    scheduler = cogvideox_scheduler()
    cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    return cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def effects_cogvideox(seed: int = 0, latent_channels: int = 8, temporal_compression: int = 1):
    """A CogVideoX T2V pipeline sized to *learn* the procedural effects world (video2lora.effects.world) on CPU.

    32x32 clips of 9 frames. VAE: 4x spatial and, by default, no temporal compression (the CogVideoX VAE
    averages frame pairs when it compresses time, which smears frame-level effects such as flicker and shake),
    so a clip is 9 latent frames of 8x8x8; DiT: patch 2 -> 16 tokens per frame, 144 video tokens, 6 blocks of
    width 128 (about 3 M parameters). Text: a tiny T5 over the offline tokenizer (every caption word is a
    token). Random weights encode nothing: `video2lora.effects.pretrain` trains the VAE, then the DiT (and text
    encoder) before the backbone is frozen; see docs/EFFECTS.md."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_t5(tokenizer, d_model=64, d_kv=16, d_ff=128, num_heads=4)
    # scaling_factor is set from the trained encoder's latent statistics by video2lora.effects.pretrain
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


def tiny_wan(seed: int = 0, latent_channels: int = 4, text_len: int = 16):
    """A Wan2.1 T2V pipeline with the real architecture at toy size: VAE 8x spatial / 4x temporal, patch
    (1, 2, 2), so a 32x32 9-frame clip is 3 latent frames of 4x4 and 12 tokens."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = text_len  # saved in tokenizer_config.json; WanBackbone pads prompts to it
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    )
    g = torch.Generator().manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=latent_channels,
        dim_mult=[1, 2, 2, 2],  # three 2x spatial downsamples: 8x, as scale_factor_spatial says
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],  # 4x temporal, as scale_factor_temporal says
        latents_mean=(torch.randn(latent_channels, generator=g) * 0.2).tolist(),
        latents_std=(0.5 + torch.rand(latent_channels, generator=g)).tolist(),
        scale_factor_spatial=8,
        scale_factor_temporal=4,
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    # what the Wan2.1 checkpoints ship: UniPC on flow sigmas with a shift
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000,
    )
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def small_cogvideox(seed: int = 0):
    """CogVideoX text-to-video at benchmark size: DiT of 6 blocks x width 384 (12.6 M parameters) over 17x32x32
    clips (5 latent frames of 8x8, 80 video tokens + 16 text tokens); VAE and T5 as small as the tiny preset's.
    Denoising dominates a row as it does at full size (CogVideoX-5b on an H200: VAE decode 3.4 s against
    50 steps x 1.9 s of denoising)."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_t5(tokenizer, d_model=64, d_kv=32, d_ff=128, num_heads=2)
    vae = tiny_cogvideox_vae((8, 16, 16), latent_channels=4, temporal_compression=4)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=64,
        text_embed_dim=64, num_layers=6, sample_width=8, sample_height=8, sample_frames=17, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True,
    )
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=cogvideox_scheduler())


# the DiT of THUDM/CogVideoX-5b-I2V (transformer/config.json, dimensions only)
COGVIDEOX_5B_I2V_TRANSFORMER = dict(
    num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16, time_embed_dim=512,
    text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
    use_learned_positional_embeddings=True,
)
# the text encoder of the CogVideoX checkpoints (text_encoder/config.json: T5 v1.1 XXL encoder) and their VAE
# (vae/config.json: AutoencoderKLCogVideoX's defaults but the scaling factor)
T5_XXL_ENCODER = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
COGVIDEOX_5B_VAE = dict(scaling_factor=0.7)
PAPER_GENERATION = {"num_frames": 49, "height": 480, "width": 720, "steps": 50, "guidance_scale": 6.0}
WAN_GENERATION = {"num_frames": 81, "height": 480, "width": 832, "steps": 50, "guidance_scale": 5.0}  # WanPipeline's


@dataclass(frozen=True)
class Preset:
    """A named model size. `build(seed)` returns a seeded diffusers pipeline (None: a published checkpoint)."""

    name: str
    generation: dict  # num_frames, height, width, steps, guidance_scale this model is made for
    build: Callable[[int], object] | None = None
    source: str = ""  # the published checkpoint these dimensions are read from
    family: str = "cogvideox"  # "cogvideox" or "wan": module names of the adapted layers
    blocks: int = 0  # published transformer: blocks, heads, head_dim, latent channels
    heads: int = 0
    head_dim: int = 0
    latent_channels: int = 16
    transformer: dict = field(default_factory=dict)  # full component configs, where a check builds them
    text_encoder: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


TINY_GENERATION = {"num_frames": 9, "height": 32, "width": 32, "steps": 10, "guidance_scale": 6.0}
EFFECTS_GENERATION = {"num_frames": 9, "height": 32, "width": 32, "steps": 25, "guidance_scale": 4.0}
SMALL_GENERATION = {"num_frames": 17, "height": 32, "width": 32, "steps": 50, "guidance_scale": 6.0}  # 50: the paper's

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny-cogvideox", TINY_GENERATION, lambda seed: tiny_cogvideox(i2v=False, seed=seed)),
    Preset("tiny-cogvideox-i2v", TINY_GENERATION, lambda seed: tiny_cogvideox(i2v=True, seed=seed),
           transformer=tiny_cogvideox_transformer(i2v=True)),
    Preset("tiny-wan", TINY_GENERATION, lambda seed: tiny_wan(seed=seed), family="wan"),
    Preset("effects-cogvideox", EFFECTS_GENERATION, lambda seed: effects_cogvideox(seed=seed)),
    Preset("small-cogvideox", SMALL_GENERATION, lambda seed: small_cogvideox(seed=seed)),
    Preset("cogvideox-5b", PAPER_GENERATION, source="THUDM/CogVideoX-5b-I2V", blocks=42, heads=48, head_dim=64,
           transformer=COGVIDEOX_5B_I2V_TRANSFORMER, text_encoder=T5_XXL_ENCODER, vae=COGVIDEOX_5B_VAE),
    Preset("cogvideox-5b-t2v", PAPER_GENERATION, source="THUDM/CogVideoX-5b", blocks=42, heads=48, head_dim=64),
    Preset("cogvideox-2b", PAPER_GENERATION, source="THUDM/CogVideoX-2b", blocks=30, heads=30, head_dim=64),
    Preset("wan2.1-1.3b", WAN_GENERATION, source="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", family="wan", blocks=30,
           heads=12, head_dim=128),
    Preset("wan2.1-14b", WAN_GENERATION, source="Wan-AI/Wan2.1-T2V-14B-Diffusers", family="wan", blocks=40,
           heads=40, head_dim=128),
)}
SEEDED = tuple(name for name, p in PRESETS.items() if p.build is not None)
PUBLISHED = tuple(name for name, p in PRESETS.items() if p.build is None)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def build_pipeline(name: str, seed: int = 0):
    """The seeded diffusers pipeline of a preset (same seed, same weights on every machine)."""
    preset = get_preset(name)
    if preset.build is None:
        raise ValueError(f"preset {name!r} is the published {preset.source}: load its weights, it is not built here")
    return preset.build(seed)


def save_preset(name: str, directory: str, seed: int = 0) -> str:
    """Build a seeded preset and save it as a diffusers pipeline directory with its generation defaults."""
    build_pipeline(name, seed).save_pretrained(directory, safe_serialization=True)
    write_generation_defaults(directory, get_preset(name).generation)
    return directory


def write_generation_defaults(directory: str, values: dict) -> None:
    with open(os.path.join(directory, DEFAULTS_NAME), "w") as f:
        json.dump(values, f, indent=2)
