"""On-disk cache of training latents and caption features, keyed by content.

A file's name is the sha256 of everything that determines its tensor (image bytes, bucket size and
the VAE's identity for a latent; caption text and the text encoder's identity for features), so a
changed image, caption or model simply misses the cache and stale files are never read. Identity is
a fingerprint of the model's weights: every tensor's name, shape and dtype plus an evenly strided
sample of ≤ 1024 elements of each, so a fine-tuned or LoRA-merged model gets a new identity without
hashing gigabytes. Files are written to a temporary name and renamed (atomic on one filesystem); a
file that does not load, or whose stored key or shape disagrees, is logged and recomputed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..safetensors_file import save_atomic

logger = logging.getLogger(__name__)

FORMAT = "zimage-train-cache-v1"  # bump when the pixels → latent recipe changes (resize, crop, encode)
_SAMPLES_PER_TENSOR = 1024


def weights_fingerprint(module: nn.Module) -> str:
    """A stable hex digest of a module's weights: names, shapes, dtypes and a strided sample of values."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            h.update(flat[::step].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def vae_identity(vae) -> str:
    """The VAE's weights plus its latent normalisation (`cfg`), which also shapes the latents."""
    return _digest(weights_fingerprint(vae), repr(getattr(vae, "cfg", None)))


def text_encoder_identity(text_encoder) -> str:
    """The Qwen3 weights plus what the tokenizer turns a caption into (class, size, chat template)."""
    tok = getattr(text_encoder, "tokenizer", None)
    tok_id = "" if tok is None else f"{type(tok).__name__}|{len(tok)}|{getattr(tok, 'chat_template', '')}"
    return _digest(weights_fingerprint(text_encoder.model), tok_id)


def latent_key(image_digest: str, bucket: tuple[int, int], vae_id: str) -> str:
    return _digest(FORMAT, "latent", image_digest, f"{bucket[0]}x{bucket[1]}", vae_id)


def caption_key(caption: str, te_id: str) -> str:
    return _digest(FORMAT, "caption", caption, te_id)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")  # keeps ("ab", "c") apart from ("a", "bc")
    return h.hexdigest()


class TensorCache:
    """`cache_dir/<kind>/<key>.safetensors` holding one tensor; `None` as the folder disables it."""

    def __init__(self, cache_dir: str | Path | None) -> None:
        self.root = None if cache_dir is None else Path(cache_dir)

    def path(self, kind: str, key: str) -> Path | None:
        return None if self.root is None else self.root / kind / f"{key}.safetensors"

    def load(self, kind: str, key: str, valid: Callable[[torch.Tensor], bool]) -> torch.Tensor | None:
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    raise ValueError("stored key differs from the file name")
                tensor = f.get_tensor("tensor")
            if not valid(tensor):
                raise ValueError(f"unexpected shape {list(tensor.shape)}")
        except Exception as e:  # any unreadable file is a cache miss, never a failed run
            logger.warning("training cache: ignoring %s (%s); recomputing", path, e)
            return None
        return tensor

    def save(self, kind: str, key: str, tensor: torch.Tensor) -> None:
        path = self.path(kind, key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(path, {"tensor": tensor.detach().cpu().contiguous()}, {"key": key, "format": FORMAT})
