"""Shared pieces of the trainer tests: tiny training items, a bit-exact model hash, a fixed-noise evaluation loss,
and the model files `python -m zimage_core train` reads (write_cli_models)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file

import te_fixtures as tf
import vae_fixtures as vf
from zimage_core.train.data import TrainItem
from zimage_core.train.loss import flow_matching_loss
from zimage_fixtures import comfy_state_dict, diffusers_dit


def write_cli_models(root: Path) -> Path:
    """root/dit.safetensors (ComfyUI single file), qwen3.safetensors, ae.safetensors (BFL) and tokenizer/: the
    tiny random models a training TOML names, with fixed seeds."""
    save_file(comfy_state_dict(diffusers_dit(seed=3).state_dict()), root / "dit.safetensors")
    save_file(tf.hf_state_dict(tf.qwen3_model(seed=4)), root / "qwen3.safetensors")
    vf.write_bfl(vf.diffusers_vae(seed=5).state_dict(), root / "ae.safetensors")
    tf.write_tiny_tokenizer(root / "tokenizer")
    return root


def make_items(n: int = 2) -> list[TrainItem]:
    """n cached items for the tiny DiT: 4×4 latents (32 px), caption features of 6, 7, … tokens, seeded."""
    g = torch.Generator().manual_seed(42)
    return [TrainItem(torch.randn(16, 4, 4, generator=g), torch.randn(6 + i, 64, generator=g), f"caption {i}",
                      (32, 32), f"item{i}") for i in range(n)]


def state_hash(module: torch.nn.Module) -> str:
    """SHA-256 of every state_dict tensor's name, dtype, device and bytes: equal only when bit for bit equal."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode() + str(t.dtype).encode() + str(t.device).encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def eval_loss(dit, items, lora=None) -> float:
    """Loss on every item at σ ∈ {0.2, 0.4, 0.6, 0.8} with one fixed noise draw, with `lora` attached if given."""
    sigmas = torch.tensor([0.2, 0.4, 0.6, 0.8])
    x0 = torch.stack([it.latent for it in items for _ in sigmas])
    caps = [it.caption_features for it in items for _ in sigmas]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        if lora is None:
            return flow_matching_loss(dit, x0, noise, sigmas.repeat(len(items)), caps).item()
        with lora.attached():
            return flow_matching_loss(dit, x0, noise, sigmas.repeat(len(items)), caps).item()
