"""The trained part of Video2LoRA: a hypernetwork plus the shared aux matrices of every adapted layer.

reference latent (N, C, F, h, w) -> video tokens -> weight tokens (one per adapted layer) through a
small transformer decoder, refined over a few iterations -> A_pred (N, L, r, down), B_pred (N, L, up, r).
"""

from __future__ import annotations

import json
import logging
import torch
import torch.nn.functional as F
from torch import nn

from .config import HEAD_INITS, Video2LoRAConfig
from .lightlora import LayerLoRA

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "video2lora.safetensors"
CONFIG_NAME = "config.json"


class DecoderBlock(nn.Module):
    """Pre-norm transformer decoder block: self-attention over weight tokens, cross-attention to video."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.norm_video = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm3 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, tokens: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        h = self.norm1(tokens)
        tokens = tokens + self.self_attn(h, h, h, need_weights=False)[0]
        h, v = self.norm2(tokens), self.norm_video(video)
        tokens = tokens + self.cross_attn(h, v, v, need_weights=False)[0]
        return tokens + self.mlp(self.norm3(tokens))


class EncoderBlock(nn.Module):
    """Pre-norm self-attention block over the video tokens: lets them compare frames before they are pooled."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        h = self.norm1(video)
        video = video + self.attn(h, h, h, need_weights=False)[0]
        return video + self.mlp(self.norm2(video))


def frame_norm(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, F, h, w): every frame's channels standardised over space (a flat frame becomes zeros; the std floor
    1e-3 assumes latents at the VAE's scale, about unit variance)."""
    mean = latents.mean(dim=(-2, -1), keepdim=True)
    std = latents.std(dim=(-2, -1), keepdim=True, correction=0).clamp_min(1e-3)
    return (latents - mean) / std


def frame_correlation(latents: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, (2r+1)^2, F, h, w): cosine similarity of each position's standardised feature vector with the previous
    frame's vectors shifted by (dy, dx), |dy|, |dx| <= radius (a cost volume, as optical-flow networks use);
    zeros for the first frame and outside the frame."""
    v = F.normalize(frame_norm(latents), dim=1)
    h, w = v.shape[-2:]
    r = radius
    prev, cur = F.pad(v[:, :, :-1], (r, r, r, r)), v[:, :, 1:]
    sims = [(cur * prev[..., r + dy : r + dy + h, r + dx : r + dx + w]).sum(1)
            for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    return F.pad(torch.stack(sims, 1), (0, 0, 0, 0, 1, 0))


def init_head(head: nn.Linear, kind: str, std: float, rank: int, down: int, iterations: int) -> None:
    """Initialise the prediction head, whose first rank * down outputs are A_pred and the rest B_pred.

    "tiny": every weight N(0, std). "lora": A_pred's rows N(0, 1 / (iterations * sqrt(width * down))), so that the
    LayerNormed tokens (unit variance per feature) of the `iterations` refinements add up to A_pred rows of about
    unit norm (as the warm start's tables), and B_pred's rows zero: LoRA's A random and B zero, the predicted LoRA
    exactly zero at the start but not its gradient. The bias starts at zero in both."""
    if kind == "tiny":
        nn.init.normal_(head.weight, std=std)
    elif kind == "lora":
        a_rows = rank * down
        with torch.no_grad():
            head.weight[:a_rows].normal_(std=(head.in_features * down) ** -0.5 / max(1, iterations))
            head.weight[a_rows:].zero_()
    else:
        raise ValueError(f"HyperConfig.head_init {kind!r}: expected one of {HEAD_INITS}")
    nn.init.zeros_(head.bias)


def randomise_look(latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, C, F, h, w) latents with their look randomised and their motion kept: per clip a random orthogonal mix of
    the channels (colour, inversion), per frame a random 3x3 Gaussian blur (sigma up to 1.2) and, one frame in four,
    a 2x2 pixelation (even sizes only). Content moves to neighbouring positions at most, never between frames.
    Drawn on the CPU (`generator`: a CPU generator, or None for torch's global one)."""
    n, c, f, h, w = latents.shape
    dev, dtype = latents.device, latents.dtype
    mix = torch.linalg.qr(torch.randn(n, c, c, generator=generator))[0]
    sigma = (torch.rand(n * f, generator=generator) * 1.2).clamp_min(1e-3)
    pixelate = (torch.rand(n * f, generator=generator) < 0.25) & (h % 2 == 0) & (w % 2 == 0)
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0])[None] / (2 * sigma[:, None] ** 2))
    taps = (taps / taps.sum(1, keepdim=True)).to(dev, dtype)[:, :, None, None, None]  # (N*F, 3, 1, 1, 1)
    frames = torch.einsum("nij,njfhw->nfihw", mix.to(dev, dtype), latents).reshape(n * f, c, h, w)
    padded = F.pad(frames, (1, 1, 1, 1), mode="replicate")
    rows = sum(taps[:, i] * padded[:, :, i: i + h] for i in range(3))
    frames = sum(taps[:, i] * rows[..., i: i + w] for i in range(3))
    if pixelate.any():
        frames = frames.clone()
        frames[pixelate.to(dev)] = F.interpolate(F.avg_pool2d(frames[pixelate.to(dev)], 2), scale_factor=2, mode="nearest")
    return frames.reshape(n, f, c, h, w).transpose(1, 2)


class HyperNetwork(nn.Module):
    def __init__(self, config: Video2LoRAConfig):
        super().__init__()
        hc, lc = config.hyper, config.lora
        self.rank, self.down, self.up = lc.rank, lc.down, lc.up
        self.iterations = hc.iterations
        self.patch = hc.latent_patch
        num_layers = len(config.layers)
        w = hc.width
        # the paper projects latent patches linearly; a conv stem lets each token see its neighbours in space and
        # time (motion, flicker), which a token-wise projection followed by attention pooling learns only slowly
        self.features, self.radius = hc.reference_features, hc.correlation_radius
        sizes = {"latent": config.latent_channels, "frame_norm": config.latent_channels,
                 "correlation": (2 * self.radius + 1) ** 2}
        c_in = sum(sizes[f] for f in self.features)
        c = hc.stem_channels or c_in
        self.stem = (nn.Sequential(nn.Conv3d(c_in, c, 3, padding=1), nn.GELU(),
                                   nn.Conv3d(c, c, 3, padding=1), nn.GELU())
                     if hc.stem_channels else nn.Identity())
        self.video_proj = nn.Linear(c * self.patch**2, w)
        # factorised learned positions, so any clip length and frame size works
        self.frame_pos = nn.Parameter(torch.randn(64, w) * 0.02)
        self.row_pos = nn.Parameter(torch.randn(128, w) * 0.02)
        self.col_pos = nn.Parameter(torch.randn(128, w) * 0.02)
        self.weight_embed = nn.Linear(lc.pred_size, w, bias=False)  # current prediction -> token
        self.layer_pos = nn.Parameter(torch.randn(num_layers, w) * 0.02)
        self.encoder = nn.ModuleList(EncoderBlock(w, hc.num_heads, hc.mlp_ratio) for _ in range(hc.encoder_blocks))
        self.blocks = nn.ModuleList(DecoderBlock(w, hc.num_heads, hc.mlp_ratio) for _ in range(hc.num_blocks))
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, lc.pred_size)
        init_head(self.head, hc.head_init, hc.head_init_std, lc.rank, lc.down, hc.iterations)

    def reference_features(self, latents: torch.Tensor) -> torch.Tensor:
        if self.features == ("latent",):
            return latents
        x = latents.float()  # standardising in bf16 / fp16 adds noise (and NaNs for flat frames in fp16)
        make = {"latent": lambda x: x, "frame_norm": frame_norm, "correlation": lambda x: frame_correlation(x, self.radius)}
        return torch.cat([make[f](x) for f in self.features], dim=1).to(latents.dtype)

    def video_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        latents = self.stem(self.reference_features(latents))
        n, c, f, h, w = latents.shape
        p = self.patch
        latents = F.pad(latents, (0, (-w) % p, 0, (-h) % p))
        gh, gw = latents.shape[-2] // p, latents.shape[-1] // p
        if f > self.frame_pos.shape[0] or gh > self.row_pos.shape[0] or gw > self.col_pos.shape[0]:
            raise ValueError(f"reference latent grid {f}x{gh}x{gw} exceeds the hypernetwork's position tables")
        x = latents.reshape(n, c, f, gh, p, gw, p).permute(0, 2, 3, 5, 1, 4, 6).reshape(n, f, gh, gw, c * p * p)
        x = self.video_proj(x)
        x = x + self.frame_pos[:f, None, None] + self.row_pos[None, :gh, None] + self.col_pos[None, None, :gw]
        x = x.reshape(n, f * gh * gw, -1)
        for block in self.encoder:
            x = block(x)
        return x

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        video = self.video_tokens(latents)
        n, num_layers = latents.shape[0], self.layer_pos.shape[0]
        weights = video.new_zeros(n, num_layers, self.head.out_features)  # zero-initialised weight tokens
        for _ in range(self.iterations):
            tokens = self.weight_embed(weights) + self.layer_pos
            for block in self.blocks:
                tokens = block(tokens, video)
            weights = weights + self.head(self.norm(tokens))  # each iteration refines the last
        a_pred = weights[..., : self.rank * self.down].reshape(n, num_layers, self.rank, self.down)
        b_pred = weights[..., self.rank * self.down :].reshape(n, num_layers, self.up, self.rank)
        return a_pred, b_pred


class MotionLookHyperNetwork(nn.Module):
    """`hyper.motion_stream`: two hypernetworks, each predicting half the LoRA rank: the first half (the motion slot
    of the factorised warm start) from the reference with its look randomised in training (`randomise_look`), the
    second from the reference as it is. One hypernetwork for both slots named a held-out compound's motion by the
    pairing it knew; two, each trained on its own slot, read the parts of new pairings (docs/EFFECTS.md, "Two
    hypernetworks": the split did it, the randomisation changed little there)."""

    def __init__(self, config: Video2LoRAConfig):
        super().__init__()
        if config.lora.rank % 2:
            raise ValueError(f"hyper.motion_stream splits the LoRA rank in two halves: lora.rank {config.lora.rank} is odd")
        whole = config.to_dict()
        half = Video2LoRAConfig.from_dict({**whole, "lora": {**whole["lora"], "rank": config.lora.rank // 2}})
        self.motion, self.look = HyperNetwork(half), HyperNetwork(half)

    @property
    def video_proj(self) -> nn.Linear:  # the dtype Video2LoRAModel.predict casts to
        return self.motion.video_proj

    def forward(self, latents: torch.Tensor, generator: torch.Generator | None = None):
        motion_in = randomise_look(latents, generator) if self.training else latents
        (a_motion, b_motion), (a_look, b_look) = self.motion(motion_in), self.look(latents)
        return torch.cat([a_motion, a_look], 2), torch.cat([b_motion, b_look], 3)


class Video2LoRAModel(nn.Module):
    """Hypernetwork + aux matrices: everything that trains. The backbone stays frozen outside."""

    def __init__(self, config: Video2LoRAConfig):
        super().__init__()
        if not config.layers:
            raise ValueError("Video2LoRAConfig.layers is empty: build it with Video2LoRAConfig.for_backbone")
        self.config = config
        lc = config.lora
        self.hypernet = MotionLookHyperNetwork(config) if config.hyper.motion_stream else HyperNetwork(config)
        self.a_aux = nn.ParameterList(nn.Parameter(nn.init.orthogonal_(torch.empty(lc.down, i))) for _, i, _ in config.layers)
        self.b_aux = nn.ParameterList(nn.Parameter(nn.init.orthogonal_(torch.empty(o, lc.up))) for _, _, o in config.layers)

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _, _ in self.config.layers]

    def predict(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_pred, B_pred) for a batch of reference latents; computed once per reference. `generator` draws the
        motion stream's look randomisation in training (hyper.motion_stream); nothing else is random."""
        latents = latents.to(self.hypernet.video_proj.weight.dtype)
        if isinstance(self.hypernet, MotionLookHyperNetwork):
            return self.hypernet(latents, generator)
        return self.hypernet(latents)

    def materialize(self, a_pred: torch.Tensor, b_pred: torch.Tensor) -> list[LayerLoRA]:
        """Per layer: down = A_pred @ A_aux (N, r, in), up = scale * B_aux @ B_pred (N, out, r)."""
        scale = self.config.lora.scale
        return [
            LayerLoRA(down=a_pred[:, i] @ self.a_aux[i], up=scale * (self.b_aux[i] @ b_pred[:, i]))
            for i in range(len(self.config.layers))
        ]

    def forward(self, latents: torch.Tensor) -> list[LayerLoRA]:
        return self.materialize(*self.predict(latents))

    # --- artifacts: safetensors + JSON, never pickle ---
    def save_pretrained(self, directory: str) -> None:
        from .storage import join, write_bytes_atomic

        from safetensors.torch import save as save_bytes

        state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        write_bytes_atomic(join(directory, WEIGHTS_NAME), save_bytes(state, metadata={"format": "video2lora"}))
        write_bytes_atomic(join(directory, CONFIG_NAME), self.config.to_json().encode())

    @classmethod
    def from_pretrained(cls, uri: str, map_location: str | torch.device = "cpu") -> "Video2LoRAModel":
        return cls.from_bytes(*read_checkpoint_files(uri), uri, map_location)

    @classmethod
    def from_bytes(cls, config_bytes: bytes, weights_bytes: bytes, uri: str = "",
                   map_location: str | torch.device = "cpu") -> "Video2LoRAModel":
        """The checkpoint from its two files' bytes, already read (`uri` names them in errors)."""
        from .storage import join

        try:
            config = Video2LoRAConfig.from_dict(json.loads(config_bytes))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{join(uri, CONFIG_NAME)}: not a Video2LoRA config ({e})") from e
        state = load_safetensors_bytes(weights_bytes, join(uri, WEIGHTS_NAME))
        model = cls(config)
        expected = model.state_dict()
        missing, unexpected = set(expected) - set(state), set(state) - set(expected)
        bad = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
        if missing or unexpected or bad:
            raise ValueError(
                f"{join(uri, WEIGHTS_NAME)} does not match its config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}, wrong shapes {sorted(bad)[:5]}"
            )
        model.load_state_dict(state)
        return model.to(map_location).eval()  # as diffusers loads: inference mode (the motion stream randomises in train)

    def num_parameters(self) -> dict[str, int]:
        hyper = sum(p.numel() for p in self.hypernet.parameters())
        aux = sum(p.numel() for p in self.a_aux.parameters()) + sum(p.numel() for p in self.b_aux.parameters())
        return {"hypernetwork": hyper, "aux": aux, "total": hyper + aux}


def read_checkpoint_files(uri: str) -> tuple[bytes, bytes]:
    """A Video2LoRA checkpoint's config.json and weights bytes, as from_pretrained reads them."""
    from .storage import join, read_bytes

    return read_bytes(join(uri, CONFIG_NAME)), read_bytes(join(uri, WEIGHTS_NAME))


def load_safetensors_bytes(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """Load a safetensors blob; anything else (a pickle, a zip from torch.save) is refused, never unpickled."""
    from safetensors.torch import load as load_bytes

    if len(data) < 10 or data[8:9] != b"{":
        raise ValueError(f"{name}: not a safetensors file (we never unpickle weights; convert it to safetensors)")
    try:
        return load_bytes(data)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{name}: corrupt safetensors file ({e})") from e



def load_safetensors_with_metadata(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`load_safetensors_bytes`, and the file's string metadata (its header's `__metadata__`; {} when none)."""
    tensors = load_safetensors_bytes(data, name)  # refuses anything but safetensors before its header is read
    return tensors, json.loads(data[8: 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}