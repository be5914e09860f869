"""The Flux VAE (`ae.safetensors`): an AutoencoderKL with 16 latent channels, under BFL / ComfyUI key names.

Architecture (ZIMAGE_SPEC §4; BFL flux `modules/autoencoder.py`): ch 128, ch_mult (1, 2, 4, 4), two
resnets per encoder level and three per decoder level, GroupNorm(32, eps 1e-6) + SiLU, one single-head
attention in each mid block, nearest ×2 upsampling + conv, (0, 1, 0, 1) padding + stride-2 conv
downsampling, no quant_conv / post_quant_conv. Module attribute names are the checkpoint keys.

Conventions: pixels are (B, 3, H, W) in [-1, 1]. Latents are in the DiT's model space,
z_model = (z_vae − shift) · scale with the Flux values shift 0.1159, scale 0.3611. `encode` returns
the posterior mode (its mean, as the diffusers ControlNet pipeline does); `decode` returns float32
pixels, not clamped. Both run without autograd and update their own temporaries in place.

dtype: fp32 by default, because half-precision decodes are where users meet NaN / black images.
bf16 keeps fp32's range and is allowed (≈3 significant digits). fp16 is allowed but can overflow:
its largest value is 65504, the decoder's activations are not bounded by construction, and an
overflow becomes inf → NaN → a black image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Piece, check_keys, stream_weights
from .keymaps import VAE_LINEAR_AS_CONV, VAE_PREFIXES, VAELayout, join_key, split_key, vae_from_diffusers
from .probe import FOREIGN_NAMES, ModelKind, classify
from .sources import Source, open_source
from .vae_config import FLUX_VAE, NORM_EPS, NORM_GROUPS, VAEConfig, vae_config, vae_layout
from .vae_tiling import decode_in_bands

__all__ = ["FLUX_VAE", "FluxVAE", "VAEConfig", "VAEPlan", "load_vae", "plan_vae", "vae_config", "vae_layout"]

_SCORES_PER_CHUNK = 2**26  # attention scores materialised at once (256 MiB in fp32) when a kernel does not tile


# --- modules -----------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS)


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)  # x is always a temporary of ours (no autograd here)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_act(self.norm1(x)))
        h = self.conv2(_act(self.norm2(h)))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q, k, v, proj_out are stored as 1×1 convs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def _linear(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, conv.weight.view(conv.out_channels, conv.in_channels), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C): a 1×1 conv is a Linear over positions
        q, k, v = (self._linear(m, t).unsqueeze(1) for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        a = _attention(q, k, v).squeeze(1)
        return self._linear(self.proj_out, a).transpose(1, 2).reshape(b, c, h, w).add_(x)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA in query chunks, so a backend without a tiled kernel (fp32, head dim 512) stays within a bound."""
    n = q.shape[-2]
    step = max(1, _SCORES_PER_CHUNK // (q.shape[0] * k.shape[-2]))
    if step >= n:
        return F.scaled_dot_product_attention(q, k, v)
    out = torch.empty_like(q)
    for i in range(0, n, step):
        out[..., i:i + step, :] = F.scaled_dot_product_attention(q[..., i:i + step, :], k, v)
    return out


class MidBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


class Upsample(nn.Module):
    """Nearest ×2, then a 3×3 conv; computed as four 2×2 convs (one per output phase) on the small input.

    Of the 3×3 taps, those that read the same input pixel are summed first: the same result up to
    rounding with 16/36 of the multiply-adds, and the upsampled tensor is never materialised.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.padded(F.pad(x, (1, 1, 1, 1)))

    def phase_weight(self) -> torch.Tensor:
        """(4·O, I, 2, 2) kernels of output phases (a, c) = (0, 0), (0, 1), (1, 0), (1, 1), channel o·4 + 2a + c."""
        w = self.conv.weight.float()
        phases = [kc for ka in _fold(w, 2) for kc in _fold(ka, 3)]
        return torch.stack(phases, 1).reshape(-1, w.shape[1], 2, 2).to(self.conv.weight.dtype)

    def padded(self, xp: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h + 2, w + 2) input with one row / column of zeros or halo on each side → (B, C, 2h, 2w).

        `weight` is `phase_weight()`, when the caller reuses it across calls.
        """
        b, _, h, w = xp.shape[0], xp.shape[1], xp.shape[2] - 2, xp.shape[3] - 2
        o = self.conv.out_channels
        weight = self.phase_weight() if weight is None else weight
        y = F.conv2d(xp, weight, self.conv.bias.repeat_interleave(4)).view(b, o, 2, 2, h + 1, w + 1)
        out = xp.new_empty(b, o, h, 2, w, 2)
        for a in (0, 1):
            for c in (0, 1):
                out[:, :, :, a, :, c] = y[:, :, a, c, a:a + h, c:c + w]  # output pixel (2i + a, 2j + c)
        return out.view(b, o, 2 * h, 2 * w)


def _fold(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 taps along `dim` → 2 per output phase. With one pixel of padding, output row 2i reads padded input rows
    i (tap 0) and i + 1 (taps 1, 2); row 2i + 1 reads rows i + 1 (taps 0, 1) and i + 2 (tap 2)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(block_in if j == 0 else block_out, block_out)
                                        for j in range(cfg.num_res_blocks))
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_out)
            self.down.append(level)
            block_in = block_out
        self.mid = MidBlock(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)  # posterior mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(_act(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """`up[i]` is level i counted from full resolution (BFL order); forward runs it from the deepest."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(block_in if j == 0 else block_out, block_out)
                                        for j in range(cfg.num_res_blocks + 1))
            if i != 0:
                level.upsample = Upsample(block_out)
            levels.insert(0, level)
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_act(self.norm_out(h)))


class FluxVAE(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1], H and W multiples of 8 → (B, 16, H/8, W/8) float32 model-space latents."""
        f = self.cfg.downscale
        if pixels.ndim != 4 or pixels.shape[1] != self.cfg.in_channels or pixels.shape[2] % f or pixels.shape[3] % f:
            raise ValueError(f"VAE encode: pixels {list(pixels.shape)} must be (B, {self.cfg.in_channels}, H, W) "
                             f"with H and W multiples of {f}")
        weight = self.encoder.conv_in.weight
        moments = self.encoder(pixels.to(weight.device, weight.dtype))  # (B, 2·z, h, w): mean, log-variance
        mean = moments[:, : self.cfg.z_channels].float()  # the posterior mode
        return (mean - self.cfg.shift) * self.cfg.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile_size: int | None = None) -> torch.Tensor:
        """(B, 16, h, w) model-space latents → (B, 3, 8h, 8w) float32 pixels in [-1, 1], not clamped.

        `tile_size` (pixels, as in ComfyUI's VAE Decode (Tiled)): decode the up path in full-width
        horizontal bands this many pixels high, for large images in less memory, with the result of
        the whole-image decode up to float rounding (see `vae_tiling`). Peak activation memory in
        fp32, P = B·H·W output pixels: ≈ 3.5 KiB·P whole; ≈ 1 KiB·P + 4 KiB·(tile_size + 8)·B·W banded.
        """
        if latents.ndim != 4 or latents.shape[1] != self.cfg.z_channels:
            raise ValueError(f"VAE decode: latents {list(latents.shape)} must be (B, {self.cfg.z_channels}, h, w)")
        if tile_size is not None and tile_size < self.cfg.downscale:
            raise ValueError(f"VAE decode: tile_size {tile_size} must be at least {self.cfg.downscale} pixels")
        weight = self.decoder.conv_in.weight
        z = (latents.to(weight.device, torch.float32) / self.cfg.scale + self.cfg.shift).to(weight.dtype)
        rows = None if tile_size is None else tile_size // self.cfg.downscale  # latent rows per band
        if rows is None or rows >= z.shape[2]:
            return self.decoder(z).float()
        return decode_in_bands(self.decoder, z, rows).float()


# --- loading -----------------------------------------------------------------------------------------


@dataclass
class VAEPlan:
    source: Source
    layout: VAELayout
    prefix: str
    config: VAEConfig
    pieces: dict[str, list[Piece]]  # our key -> the stored tensor
    shapes: dict[str, tuple[int, ...]]  # our key -> the model's shape


_NOT_A_VAE = {ModelKind.ZIMAGE_DIT: "a Z-Image DiT", ModelKind.UNKNOWN: "not a model this loader recognises"}
_WANTED = "Z-Image needs the 16-channel Flux VAE (ae.safetensors)"


def plan_vae(path: str | Path | Source) -> VAEPlan:
    """Detect the layout, map every stored key to ours, infer the config and check it: headers only."""
    src = path if isinstance(path, Source) else open_source(path, component="vae")
    tensors = src.tensors()
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in tensors)), "")
    bare = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    kind = classify(bare)
    if kind is not ModelKind.VAE:
        raise ValueError(f"{src.path}: this is {FOREIGN_NAMES.get(kind) or _NOT_A_VAE[kind]}, not a VAE; {_WANTED}")
    shapes = {k: info.shape for k, (_, info) in bare.items()}
    found = vae_config(shapes)
    _check_flux_type(src.path, found)
    layout = vae_layout(shapes)
    pieces: dict[str, list[Piece]] = {}
    stored: dict[str, str] = {}  # our key -> stored key, for messages
    for key, (header, info) in bare.items():
        module, leaf = split_key(key)
        ours = key if layout is VAELayout.BFL else \
            join_key(vae_from_diffusers(module, len(found["block_out_channels"])) or f"<unmapped {module}>", leaf)
        if ours in stored:
            raise ValueError(f"{src.path}: {stored[ours]} and {prefix + key} are both {ours}")
        pieces[ours], stored[ours] = [Piece(header, prefix + key, info)], prefix + key
    got = {k: p[0].info.shape for k, p in pieces.items()}
    try:
        config = VAEConfig.from_key_shapes(got)
    except ValueError as e:
        raise ValueError(f"{src.path} (detected {layout.value} layout): cannot infer the VAE config: {e}") from None
    if layout is VAELayout.DIFFUSERS:
        _check_diffusers_config(src)
    return VAEPlan(src, layout, prefix, config, pieces, _check_against_model(src.path, layout, config, got, stored))


def _check_flux_type(path: Path, c: dict) -> None:
    """A VAE of another family (SD/SDXL: 4 channels and quant convs) is refused before any key is compared."""
    z = c["latent_channels"]
    if z == 4:
        raise ValueError(f"{path}: is a 4-channel (SD/SDXL) VAE; {_WANTED}")
    if z not in (None, FLUX_VAE.z_channels):
        raise ValueError(f"{path}: is a {z}-channel VAE; {_WANTED}")
    if c["quant_conv"]:
        raise ValueError(f"{path}: is a VAE with quant_conv / post_quant_conv, which the Flux VAE does not have; "
                         f"{_WANTED}")


def _check_diffusers_config(src: Source) -> None:
    """A diffusers `config.json` beside the weights must state the Flux latent normalisation (SD3's VAE has the
    same keys and shapes, but scaling 1.5305 and shift 0.0609)."""
    path = src.files[0].parent / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no (readable) config: the weights alone decide
    if not isinstance(config, dict):
        return
    stated = (config.get("scaling_factor", FLUX_VAE.scale), config.get("shift_factor", FLUX_VAE.shift))
    if stated != (FLUX_VAE.scale, FLUX_VAE.shift):
        raise ValueError(f"{path}: scaling_factor {stated[0]}, shift_factor {stated[1]} are not the Flux VAE's "
                         f"({FLUX_VAE.scale}, {FLUX_VAE.shift}); {_WANTED}")


def _check_against_model(path: Path, layout: VAELayout, config: VAEConfig, got: dict[str, tuple[int, ...]],
                         stored: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Every key present, none extra, every shape right (a Linear may fill a 1×1 conv); the model's shapes."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in FluxVAE(config).state_dict().items()}
    where = f"{path} (detected {layout.value} layout, {len(config.ch_mult)} levels)"
    check_keys(where, expected, got, stored=lambda k: stored.get(k, k),
               fits=lambda k, g, e: bool(VAE_LINEAR_AS_CONV.match(k)) and (*g, 1, 1) == e)
    return expected


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> FluxVAE:
    """Load the Flux VAE: `ae.safetensors` / a ComfyUI VAE (optionally under `vae.` or `first_stage_model.`, as in
    all-in-one checkpoints), or diffusers' `vae/` folder, its file, or a model root holding it.

    Strict: a missing, unexpected or mis-shaped key, a 4-channel (SD/SDXL) VAE or another kind of model
    is one ValueError naming the file, raised from the headers before any tensor is read. See the module
    docstring for the dtype policy (fp32 by default).
    """
    plan = plan_vae(path)
    with torch.device("meta"):
        model = FluxVAE(plan.config)
    stream_weights(model, plan.source.headers, plan.pieces, plan.shapes, device, dtype)
    return model.eval().requires_grad_(False)
