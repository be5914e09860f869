"""Tiny random models under the real file names, for the real ComfyUI host (host tests and browser tests).

`write_models(models)` fills a ComfyUI models folder with what every workflow in `workflows/` names:
- diffusion_models/z_image_turbo_bf16.safetensors, text_encoders/qwen_3_4b.safetensors (the real
  vocabulary, for ComfyUI's bundled tokenizer), vae/ae.safetensors (real width, so native VAELoader takes it);
- diffusers/Z-Image-Turbo/: the official sharded release layout (transformer/, text_encoder/, tokenizer/);
- diffusion_models/ae.safetensors: a VAE in the wrong folder, for the bad-input tests.
`write_input_image(base_dir)` puts the img2img workflow's example.png into the host's input folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import te_fixtures as tf
import vae_fixtures as vf
from zimage_fixtures import comfy_state_dict, diffusers_dit, write_sharded

OFFICIAL_ROOT = "Z-Image-Turbo"
INPUT_IMAGE = "example.png"


def _bf16(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}  # as the real files are stored


def write_models(models: Path) -> dict[str, Path]:
    paths = {"dit": models / "diffusion_models" / "z_image_turbo_bf16.safetensors",
             "te": models / "text_encoders" / "qwen_3_4b.safetensors", "vae": models / "vae" / "ae.safetensors",
             "official": models / "diffusers" / OFFICIAL_ROOT}
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
    return paths


def bundled_tokenizer() -> Path:
    import comfy_host

    return comfy_host.HOST_DIR / "comfy" / "text_encoders" / "qwen25_tokenizer"


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
