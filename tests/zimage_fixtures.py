"""Tiny random-weight Z-Image DiT checkpoints in every real layout, written by the tests.

The reference weights come from diffusers' `ZImageTransformer2DModel` (the official names); the other
layouts are derived from them by the rules in ZIMAGE_SPEC §2c/§2d, written out here independently of
`zimage_core.keymaps` so that a wrong table in the core cannot agree with itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

# dim 256 with 2 heads of 128: the real RoPE split (32, 48, 48), and the smallest width at which
# ComfyUI's NextDiT builds a consistent Z-Image (its timestep embedder always outputs 256).
TINY = dict(dim=256, n_layers=2, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=64,
            axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])


KEYS = Path(__file__).parent / "fixtures" / "keys"  # copies of shared/docs/keys: the real files' key manifests


def manifest(name: str) -> dict[str, tuple[int, ...]]:
    """key → shape of a real checkpoint, from its manifest (`key<TAB>[d0, d1, …]` lines, `#` comments)."""
    rows = [line.split("\t") for line in (KEYS / name).read_text().splitlines() if line and not line.startswith("#")]
    return {k: tuple(json.loads(s)) for k, s in rows}


def diffusers_dit(seed: int = 0, **overrides):
    """A diffusers ZImageTransformer2DModel with every parameter random (norms ≈ 1, pad tokens ~ N(0,1))."""
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(**{**TINY, **overrides}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pad_token" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


_RENAME = [  # diffusers -> ComfyUI single file (ZIMAGE_SPEC §2c)
    (r"^all_x_embedder\.2-1\.", "x_embedder."),
    (r"^all_final_layer\.2-1\.", "final_layer."),
    (r"\.attention\.to_out\.0\.", ".attention.out."),
    (r"\.attention\.norm_q\.", ".attention.q_norm."),
    (r"\.attention\.norm_k\.", ".attention.k_norm."),
]


def comfy_state_dict(sd: dict[str, torch.Tensor], norm_final: bool = True) -> dict[str, torch.Tensor]:
    """The ComfyUI single-file layout: fused qkv = cat([q, k, v], dim 0), five renames, optional norm_final."""
    out = {}
    for k, v in sd.items():
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:
            k = k.replace(".to_q.", ".qkv.")
            v = torch.cat([sd[k.replace(".qkv.", f".to_{n}.")] for n in "qkv"])
        for pattern, repl in _RENAME:
            k = re.sub(pattern, repl, k)
        out[k] = v.contiguous()
    if norm_final:
        out["norm_final.weight"] = torch.ones(sd["cap_pad_token"].shape[1])
    return out


def write_shards(sd: dict[str, torch.Tensor], folder: Path, stem: str, n_shards: int) -> Path:
    """`folder/{stem}-0000i-of-0000n.safetensors` + `{stem}.safetensors.index.json`, keys dealt round-robin."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f"{stem}-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = keys[i::n_shards]
        save_file({k: sd[k].contiguous() for k in chunk}, folder / name)
        weight_map.update({k: name for k in chunk})
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


def write_sharded(sd: dict[str, torch.Tensor], folder: Path, n_shards: int = 3) -> Path:
    """The official layout: folder/transformer/diffusion_pytorch_model-0000i-of-0000n.safetensors + index."""
    tdir = write_shards(sd, Path(folder) / "transformer", "diffusion_pytorch_model", n_shards)
    (tdir / "config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel"}))
    return Path(folder)


def _fp8_targets(sd):
    return [k for k in sd if re.search(r"\.(attention\.(qkv|out)|feed_forward\.w[123])\.weight$", k)]


def scaled_fp8_state_dict(comfy_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Legacy ComfyUI scaled fp8: `scaled_fp8` marker + per-layer scalar `scale_weight` (W = W8 · scale)."""
    out = dict(comfy_sd)
    for k in _fp8_targets(comfy_sd):
        scale = comfy_sd[k].abs().max().float() / 448.0
        out[k] = (comfy_sd[k].float() / scale).to(torch.float8_e4m3fn)
        out[k.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        out[k.removesuffix("weight") + "scale_input"] = torch.ones(())
    out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return out


def comfy_quant_state_dict(comfy_sd: dict[str, torch.Tensor], fmt: str = "float8_e4m3fn") -> dict[str, torch.Tensor]:
    """Newer ComfyUI quant layout: `<layer>.weight_scale` + `<layer>.comfy_quant` (uint8 JSON)."""
    out = dict(comfy_sd)
    blob = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    for k in _fp8_targets(comfy_sd):
        scale = comfy_sd[k].abs().max().float() / 448.0
        out[k] = (comfy_sd[k].float() / scale).to(torch.float8_e4m3fn)
        out[k.removesuffix("weight") + "weight_scale"] = scale.reshape(())
        out[k.removesuffix("weight") + "comfy_quant"] = blob.clone()
    return out


def dequantised(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What an fp8 file means in full precision: W8 · scale, markers dropped."""
    out = {}
    for k, v in sd.items():
        if k == "scaled_fp8" or k.endswith((".scale_weight", ".weight_scale", ".scale_input", ".comfy_quant")):
            continue
        scale = sd.get(k.removesuffix("weight") + "scale_weight", sd.get(k.removesuffix("weight") + "weight_scale"))
        out[k] = v.float() * scale if scale is not None else v
    return out


def inputs(batch: int, cap_lens: list[int], height: int, width: int, cap_dim: int = 64, seed: int = 1):
    """Latents (B,16,H,W), model times t (B,), caption features [(L_i, cap_dim)]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, height, width, generator=g)
    t = torch.rand(batch, generator=g)
    caps = [torch.randn(n, cap_dim, generator=g) for n in cap_lens]
    return x, t, caps


def diffusers_forward(model, x, t, caps) -> torch.Tensor:
    with torch.no_grad():
        out = model(list(x.unsqueeze(2)), t, caps, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a − ref| / max |ref|: the bound every parity test states."""
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
