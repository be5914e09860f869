"""The Flux VAE's config: the frozen dataclass, its one preset, and both read back from checkpoint key shapes.

`vae_layout` / `vae_config` read any AutoencoderKL checkpoint (BFL or diffusers names, decoder-only
files too) for `python -m zimage_core inspect`; `VAEConfig.from_key_shapes` builds the loader's config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import Shapes, shape_dim
from .keymaps import VAELayout

NORM_GROUPS = 32  # GroupNorm(32, eps 1e-6) everywhere in the VAE
NORM_EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of the Flux-type AutoencoderKL (BFL field names) and its latent normalisation."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    in_channels: int
    out_channels: int
    scale: float  # z_model = (z_vae − shift) · scale
    shift: float

    def __post_init__(self) -> None:
        widths = [self.ch * m for m in self.ch_mult]
        if not widths or any(w <= 0 or w % NORM_GROUPS for w in widths) or self.num_res_blocks < 1:
            raise ValueError(f"VAEConfig: channels {widths} must be positive multiples of {NORM_GROUPS} "
                             f"(GroupNorm groups) and num_res_blocks {self.num_res_blocks} ≥ 1")

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for the Flux VAE)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_key_shapes(cls, shapes: Shapes) -> VAEConfig:
        """The architecture from BFL-named key → shape, with the Flux latent normalisation."""
        c = vae_config(shapes)
        widths = c["block_out_channels"]
        fields = (c["latent_channels"], c["layers_per_block"], c["in_channels"], c["out_channels"])
        if not widths or None in fields or not (c["encoder"] and c["decoder"]):
            raise ValueError("needs both encoder and decoder (encoder.conv_in, decoder.conv_in, decoder.conv_out, "
                             f"encoder.down.0.block.0.conv1 weights); found {c}")
        if any(w % widths[0] for w in widths):
            raise ValueError(f"level widths {widths} are not multiples of the first")
        return dataclasses.replace(FLUX_VAE, ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths),
                                   num_res_blocks=c["layers_per_block"], z_channels=c["latent_channels"],
                                   in_channels=c["in_channels"], out_channels=c["out_channels"])


FLUX_VAE = VAEConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, in_channels=3, out_channels=3,
                     scale=0.3611, shift=0.1159)


# layout -> (encoder resnet, decoder resnet) conv1 weight templates; level i, resnet j
_RESNET_CONV1 = {
    VAELayout.BFL: ("encoder.down.{i}.block.{j}.conv1.weight", "decoder.up.{i}.block.{j}.conv1.weight"),
    VAELayout.DIFFUSERS: ("encoder.down_blocks.{i}.resnets.{j}.conv1.weight",
                          "decoder.up_blocks.{i}.resnets.{j}.conv1.weight"),
}


def vae_layout(shapes: Shapes) -> VAELayout:
    """BFL (ae.safetensors / ComfyUI: `encoder.down.N.block…`) or diffusers (`encoder.down_blocks…`)."""
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.", "decoder.mid_block."))
           for k in shapes):
        return VAELayout.DIFFUSERS
    return VAELayout.BFL


def vae_config(shapes: Shapes) -> dict:
    """Channels of an AutoencoderKL from its shapes, in either layout (diffusers names for the fields)."""
    layout = vae_layout(shapes)
    enc, dec = _RESNET_CONV1[layout]
    channels = _series(shapes, enc, "i", j=0)
    per_block = len(_series(shapes, enc, "j", i=0))
    if not channels:  # decoder-only file (one more resnet per level); diffusers counts up blocks from the deepest
        channels = _series(shapes, dec, "i", j=0)[:: -1 if layout is VAELayout.DIFFUSERS else 1]
        per_block = len(_series(shapes, dec, "j", i=0)) - 1
    moments = shape_dim(shapes, "encoder.conv_out.weight", 0) or 0  # mean and log-variance: 2 × latent channels
    latent = shape_dim(shapes, "decoder.conv_in.weight", 1) or moments // 2
    return {
        "latent_channels": latent or None,
        "block_out_channels": channels,
        "layers_per_block": per_block if per_block > 0 else None,
        "in_channels": shape_dim(shapes, "encoder.conv_in.weight", 1),
        "out_channels": shape_dim(shapes, "decoder.conv_out.weight", 0),
        "encoder": "encoder.conv_in.weight" in shapes,
        "decoder": "decoder.conv_in.weight" in shapes,
        "quant_conv": "quant_conv.weight" in shapes or "post_quant_conv.weight" in shapes,
    }



def _series(shapes: Shapes, template: str, vary: str, **fixed: int) -> list[int]:
    """shape[0] of `template` with `vary` = 0, 1, … for as long as the key exists."""
    out: list[int] = []
    while (shape := shapes.get(template.format(**{vary: len(out)}, **fixed))) is not None:
        out.append(int(shape[0]))
    return out
