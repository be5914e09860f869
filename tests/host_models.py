"""Tiny random models under the real file names, for the real ComfyUI host (host tests and browser tests).

`write_models(models)` fills a ComfyUI models folder with what every workflow in `workflows/` names:
- diffusion_models/z_image_turbo_bf16.safetensors, text_encoders/qwen_3_4b.safetensors (the real
  vocabulary, for ComfyUI's bundled tokenizer), vae/ae.safetensors (real width, so native VAELoader takes it);
- diffusers/Z-Image-Turbo/: the official sharded release layout (transformer/, text_encoder/, tokenizer/);
- diffusion_models/ae.safetensors: a VAE in the wrong folder, for the bad-input tests;
- loras/: the LoRA files the LoRA workflows name (WORKFLOW_LORAS: a musubi-tuner and an AI Toolkit layout, at the
  tiny DiT's dims) and loras/flux_style_lora.safetensors, a Flux LoRA for the bad-input tests.
`write_input_image(base_dir)` puts the img2img workflow's example.png into the host's input folder.
`write_detectable_dit(path)` writes a DiT that ComfyUI's own model detection takes as Z-Image (dim 3840), for
parity with ComfyUI's native UNETLoader; `write_text_encoder(path)` the tiny Qwen3 of `write_models` alone.
`serving(root)` does both under a fresh folder and runs a host on them: `with serving(root) as (server, models)`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import comfy_host
import te_fixtures as tf
import vae_fixtures as vf
from lora_fixtures import Fmt, WrittenLora, canonical_shapes, write_flux_kohya, write_lora
from zimage_fixtures import comfy_state_dict, diffusers_dit, write_sharded

OFFICIAL_ROOT = "Z-Image-Turbo"
INPUT_IMAGE = "example.png"
WORKFLOW_LORAS = {"zimage_style_musubi.safetensors": (Fmt.MUSUBI, 11),  # file name → (trainer layout, seed)
                  "zimage_character_aitoolkit.safetensors": (Fmt.AI_TOOLKIT, 12)}
FOREIGN_LORA = "flux_style_lora.safetensors"
# ComfyUI 0.3.75 detects Z-Image only at dim 3840 (30 heads of 128); it counts n_layers from the keys and always
# builds 2 + 2 refiners; cap_feat_dim is free, so it is the tiny text encoder's width (COMFY_HOST.md §3).
# n_layers 1: 899M parameters, a 1.7 GB bf16 file, 3.6 GB in fp32 once loaded.
DETECTABLE = dict(dim=3840, n_layers=1, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
                  cap_feat_dim=tf.TINY_TE["hidden_size"])


def _bf16(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}  # as the real files are stored


def write_models(models: Path) -> dict[str, Path]:
    paths = {"dit": models / "diffusion_models" / "z_image_turbo_bf16.safetensors",
             "te": models / "text_encoders" / "qwen_3_4b.safetensors", "vae": models / "vae" / "ae.safetensors",
             "official": models / "diffusers" / OFFICIAL_ROOT, "loras": models / "loras"}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    dit = diffusers_dit(seed=3).state_dict()
    te = tf.hf_state_dict(tf.qwen3_model(seed=4, vocab_size=151936))
    save_file(_bf16(comfy_state_dict(dit)), paths["dit"])
    save_file(_bf16(te), paths["te"])
    vf.write_bfl(_bf16(vf.diffusers_vae(seed=5, ch=128).state_dict()), paths["vae"])
    shutil.copy(paths["vae"], models / "diffusion_models" / "ae.safetensors")  # a VAE put in the wrong folder
    write_sharded(_bf16(dit), paths["official"])  # the same DiT, official names and shards
    tf.write_official(_bf16(te), paths["official"])
    shutil.rmtree(paths["official"] / "tokenizer")  # the official root carries the real Qwen tokenizer files
    shutil.copytree(bundled_tokenizer(), paths["official"] / "tokenizer")
    write_workflow_loras(paths["loras"])
    write_flux_kohya(paths["loras"] / FOREIGN_LORA)
    return paths


def write_workflow_loras(folder: Path) -> dict[str, WrittenLora]:
    """WORKFLOW_LORAS into `folder`, with the dense ΔW each stands for (lora_fixtures: independent of the core)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: write_lora(fmt, folder / name, seed=seed) for name, (fmt, seed) in WORKFLOW_LORAS.items()}


def bundled_tokenizer() -> Path:
    import comfy_host

    return comfy_host.HOST_DIR / "comfy" / "text_encoders" / "qwen25_tokenizer"


@contextmanager
def serving(root: Path) -> Iterator[tuple[comfy_host.Server, dict[str, Path]]]:
    """A headless host whose models folder (root/models) and input image (root/base) are the test models."""
    models = write_models(root / "models")
    write_input_image(root / "base")
    extra = comfy_host.write_extra_paths(root / "extra_paths.yaml", root / "models")
    server = comfy_host.Server(root / "base", extra, root / "server.log").start()
    try:
        yield server, models
    finally:
        server.stop()


def write_input_image(base_dir: Path, size: tuple[int, int] = (64, 64)) -> Path:
    """A smooth RGB test card (width, height) as input/example.png (LoadImage's folder)."""
    from PIL import Image

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 255 // max(w + h - 2, 1)], -1)
    path = Path(base_dir) / "input" / INPUT_IMAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def write_text_encoder(path: Path, seed: int = 4) -> Path:
    """The tiny Qwen3 (hidden 64, the real vocabulary for ComfyUI's bundled tokenizer) as a bf16 single file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_bf16(tf.hf_state_dict(tf.qwen3_model(seed=seed, vocab_size=151936))), path)
    return path


def write_detectable_dit(path: Path, seed: int = 0, cfg: dict = DETECTABLE) -> Path:
    """A random ComfyUI single-file Z-Image DiT (bf16, every canonical key and shape plus `norm_final.weight`) that
    ComfyUI's model detection takes as Z-Image. Scales as `diffusers_dit`: matrices ~ N(0, 1/fan_in), norm scales
    ≈ 1, biases ~ 0.1, pad tokens ~ N(0, 1), so the forward stays O(1) at this width."""
    g = torch.Generator().manual_seed(seed)

    def random(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.randn(shape, generator=g)
        if "pad_token" in name:
            return x
        if len(shape) == 1:
            return 1 + 0.2 * x if name.endswith("weight") else 0.1 * x
        return x.div_(shape[1] ** 0.5)

    sd = {k: random(k, shape).to(torch.bfloat16) for k, shape in canonical_shapes(cfg).items()}
    sd["norm_final.weight"] = torch.ones(cfg["dim"], dtype=torch.bfloat16)  # ComfyUI's NextDiT has it (unused)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, path)
    return path
