"""Training data: an image folder with captions → aspect buckets → cached latents and caption features.

- `read_folder`: images (.png .jpg .jpeg .webp) with same-stem UTF-8 `.txt` captions, sorted by file
  name. Every problem (missing folder, no images, an undecodable or tiny image, a missing caption
  without a default, `[trigger]` without a trigger word) is a ValueError / FileNotFoundError naming
  the file, before any model runs.
- Images are read with Pillow: EXIF orientation applied, alpha composited onto **white** (a
  transparent PNG cut-out trains as an object on white, not on whatever colour the hidden pixels
  hold), then resized to cover the bucket (Lanczos, aspect kept) and centre-cropped.
- `bucket_size`: kohya/musubi-style buckets: for each width (a multiple of `step`) the tallest height
  with area ≤ resolution², the one whose aspect ratio is closest (in log space) to the image's.
- `build_items`: one `TrainItem` per (image, resolution). Latents are in the DiT's model space, exactly
  what `FluxVAE.encode` returns and the sampler denoises; tensors are returned on the CPU.
  With `cache_dir`, both latents and caption features are cached by content (see `cache.py`).
- `BucketBatches`: every batch comes from one bucket; the order is a pure function of (seed, epoch).
- DOP (`dop_class`, ZIMAGE_SPEC §7.4): each item also gets the features of its caption with the trigger
  word replaced by the class word (`class_caption`), encoded and cached like any caption.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cache import TensorCache, caption_key, latent_key, text_encoder_identity, vae_identity

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MIN_SIDE = 64
TRIGGER = "[trigger]"
_NEEDS_PILLOW = "reading training images needs Pillow (pip install pillow); ComfyUI ships it"
_ORIENTATION_TAG = 0x0112  # EXIF orientations 5..8 are transposed: width and height swap

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageCaption:
    """One training example on disk."""

    path: Path
    caption: str


@dataclass(frozen=True, eq=False)
class TrainItem:
    """latent (16, H/8, W/8) float32, model space; caption_features (L, hidden); bucket (W, H) in pixels.
    preservation_features (L', hidden): the class caption's (DOP only, see `class_caption`)."""

    latent: torch.Tensor
    caption_features: torch.Tensor
    caption: str
    bucket: tuple[int, int]
    key: str
    preservation_features: torch.Tensor | None = None


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as e:
        raise ImportError(_NEEDS_PILLOW) from e
    return Image, ImageOps


# ---- folder → examples -------------------------------------------------------------------------------

def read_folder(folder: str | Path, default_caption: str | None = None,
                trigger: str | None = None) -> list[ImageCaption]:
    """The folder's images with their captions, sorted by file name; checked before anything is encoded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"training folder {folder} does not exist (or is not a folder)")
    images = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                    key=lambda p: p.name)
    if not images:
        raise ValueError(f"training folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing and default_caption is None:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} image(s) in {folder} have no same-name .txt caption ({shown}); "
                         "add them or give a default caption")
    examples = []
    for path in images:
        check_image(path)
        txt = path.with_suffix(".txt")
        if txt.is_file():
            text, where = txt.read_text(encoding="utf-8").strip(), txt
        else:
            text, where = default_caption, f"{path} (default caption)"
        examples.append(ImageCaption(path, apply_trigger(text, trigger, where=where)))
    return examples


def apply_trigger(caption: str, trigger: str | None, where: object = "caption") -> str:
    """Replace every `[trigger]` with the trigger word; a caption asking for one without it is an error."""
    if TRIGGER not in caption:
        return caption
    if not trigger:
        raise ValueError(f"{where}: the caption uses {TRIGGER} but no trigger word was given")
    return caption.replace(TRIGGER, trigger)


def default_preview_prompts(caption: str, trigger: str | None) -> tuple[str, ...]:
    """Previews when none were asked for: the first training caption and, if it holds the trigger word, the same
    caption without it (what the LoRA does to the rest of the model: the prompt without the trigger should stay)."""
    if not trigger or trigger not in caption:
        return (caption,)
    plain = " ".join(caption.replace(trigger, " ").split()).strip(" ,")
    return (caption, plain) if plain else (caption,)


def class_caption(caption: str, trigger: str | None, dop_class: str, where: object = "caption") -> str:
    """DOP's class prompt: every occurrence of the trigger word replaced by the class word (AI Toolkit's rule)."""
    if not trigger:
        raise ValueError(f"{where}: DOP (class word {dop_class!r}) needs a non-empty trigger word to replace")
    if trigger not in caption:
        raise ValueError(f"{where}: DOP needs the trigger word {trigger!r} in every caption; {caption!r} has none")
    return caption.replace(trigger, dop_class)


def check_image(path: Path) -> tuple[int, int]:
    """Decode the image fully; its (width, height) after EXIF orientation. Errors name the file."""
    Image, ImageOps = _pil()
    try:
        with Image.open(path) as im:
            im.load()
            w, h = _oriented_size(im)
    except Exception as e:
        raise ValueError(f"cannot read training image {path}: {e}") from e
    if min(w, h) < MIN_SIDE:
        raise ValueError(f"training image {path} is tiny ({w}×{h}); each side needs at least {MIN_SIDE} px")
    return w, h


def _oriented_size(im) -> tuple[int, int]:
    w, h = im.size
    return (h, w) if im.getexif().get(_ORIENTATION_TAG, 1) in (5, 6, 7, 8) else (w, h)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    Image, _ = _pil()
    with Image.open(path) as im:
        return _oriented_size(im)


# ---- buckets and pixels ------------------------------------------------------------------------------

def bucket_size(width: int, height: int, resolution: int, step: int = 16) -> tuple[int, int]:
    """The (W, H), multiples of `step`, with W·H ≤ resolution², whose aspect is closest to width/height.

    Candidates are, for each W, the largest H that fits; ties go to the larger area, then the wider.
    """
    if width <= 0 or height <= 0 or step <= 0 or resolution < step:
        raise ValueError(f"bucket_size: bad image {width}×{height}, resolution {resolution} or step {step}")
    area, target = resolution * resolution, math.log(width / height)
    best, best_score = (step, step), None
    for w in range(step, area // step + 1, step):
        h = (area // w) // step * step
        if h < step:
            break
        score = (abs(math.log(w / h) - target), -w * h, -w)
        if best_score is None or score < best_score:
            best, best_score = (w, h), score
    return best


def load_pixels(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] for `size` = (W, H): cover the size (aspect kept), centre crop."""
    Image, ImageOps = _pil()
    with Image.open(path) as im:
        return _fit(ImageOps.exif_transpose(im), size)


def _fit(im, size: tuple[int, int]) -> torch.Tensor:
    Image, ImageOps = _pil()
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im.alpha_composite(rgba)
    im = ImageOps.fit(im.convert("RGB"), size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    array = np.asarray(im, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


# ---- encoding, with the cache ------------------------------------------------------------------------

class _Encoder:
    """vae/text encoder + identities + the on-disk cache; identities are computed once, lazily."""

    def __init__(self, vae, text_encoder, cache_dir: Path | None) -> None:
        self.vae, self.te, self.cache = vae, text_encoder, TensorCache(cache_dir)
        self._vae_id: str | None = None
        self._te_id: str | None = None

    def latent(self, image_digest: str, bucket: tuple[int, int], pixels: Callable[[], torch.Tensor]) -> torch.Tensor:
        self._vae_id = self._vae_id or vae_identity(self.vae)
        key = latent_key(image_digest, bucket, self._vae_id)
        shape = (bucket[1] // 8, bucket[0] // 8)
        hit = self.cache.load("latents", key, lambda t: t.ndim == 3 and tuple(t.shape[1:]) == shape)
        if hit is not None:
            return hit
        latent = self.vae.encode(pixels()[None])[0].float().cpu()
        self.cache.save("latents", key, latent)
        return latent

    def caption(self, text: str) -> torch.Tensor:
        if self.cache.root is None:  # the TextEncoder keeps its own in-memory cache
            return self.te.encode([text])[0].cpu()
        self._te_id = self._te_id or text_encoder_identity(self.te)
        key = caption_key(text, self._te_id)
        hit = self.cache.load("captions", key, lambda t: t.ndim == 2 and t.shape[0] > 0)
        if hit is not None:
            return hit
        features = self.te.encode([text])[0].cpu()
        self.cache.save("captions", key, features)
        return features


def build_items(examples: Sequence[ImageCaption], vae, text_encoder, resolutions: Sequence[int] = (512, 768, 1024),
                cache_dir: str | Path | None = None, on_progress: Progress | None = None, dop_class: str = "",
                trigger: str | None = None) -> list[TrainItem]:
    """One TrainItem per (example, resolution), in example order then resolution order. With `dop_class`, each
    caption must contain `trigger`; the items get the class caption's features (`preservation_features`)."""
    enc = _Encoder(vae, text_encoder, None if cache_dir is None else Path(cache_dir))
    items, total = [], len(examples) * len(resolutions)
    classes = [class_caption(ex.caption, trigger, dop_class, ex.path) if dop_class else None
               for ex in examples]  # every caption checked before anything is encoded
    for ex, class_text in zip(examples, classes, strict=True):
        digest = hashlib.sha256(ex.path.read_bytes()).hexdigest()
        width, height = _image_size(ex.path)
        features = enc.caption(ex.caption)
        kept = None if class_text is None else enc.caption(class_text)
        for res in resolutions:
            bucket = bucket_size(width, height, res)
            latent = enc.latent(digest, bucket, lambda b=bucket, p=ex.path: load_pixels(p, b))
            items.append(TrainItem(latent, features, ex.caption, bucket, f"{ex.path.name}@{bucket[0]}x{bucket[1]}",
                                   kept))
            if on_progress is not None:
                on_progress(len(items), total)
    return items


def images_from_tensor(images: torch.Tensor, captions: Sequence[str], vae, text_encoder,
                       resolutions: Sequence[int] = (512, 768, 1024), trigger: str | None = None,
                       cache_dir: str | Path | None = None, on_progress: Progress | None = None,
                       dop_class: str = "") -> list[TrainItem]:
    """The in-graph path: an IMAGE batch (B, H, W, 3) in [0, 1] and one caption per image (or one for all).

    Pixels are quantised to 8 bits and go through the same resize/crop as files, so a saved PNG of the
    batch trains identically. Latents are keyed by those bytes, so `cache_dir` caches them too.
    """
    Image, _ = _pil()
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"expected an IMAGE batch (B, H, W, 3), got shape {list(images.shape)}")
    captions = list(captions) * len(images) if len(captions) == 1 else list(captions)
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions (give one per image, or one for all)")
    enc = _Encoder(vae, text_encoder, None if cache_dir is None else Path(cache_dir))
    items, total = [], len(images) * len(resolutions)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        rgb = (image[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        if min(rgb.shape[:2]) < MIN_SIDE:
            raise ValueError(f"image {i} of the batch is tiny ({rgb.shape[1]}×{rgb.shape[0]}); "
                             f"each side needs at least {MIN_SIDE} px")
        caption = apply_trigger(caption.strip(), trigger, where=f"caption of image {i}")
        digest = hashlib.sha256(f"{rgb.shape}".encode() + rgb.tobytes()).hexdigest()
        features, pil = enc.caption(caption), Image.fromarray(rgb)
        kept = enc.caption(class_caption(caption, trigger, dop_class, f"caption of image {i}")) if dop_class else None
        for res in resolutions:
            bucket = bucket_size(pil.width, pil.height, res)
            latent = enc.latent(digest, bucket, lambda b=bucket, im=pil: _fit(im, b))
            items.append(TrainItem(latent, features, caption, bucket, f"image{i}@{bucket[0]}x{bucket[1]}", kept))
            if on_progress is not None:
                on_progress(len(items), total)
    return items


def empty_caption_features(text_encoder, cache_dir: str | Path | None = None) -> torch.Tensor:
    """Features of "" (for caption dropout), on the CPU; cached like any caption."""
    return _Encoder(None, text_encoder, None if cache_dir is None else Path(cache_dir)).caption("")


# ---- batches -----------------------------------------------------------------------------------------

@dataclass
class BucketBatches:
    """Deterministic same-bucket batches. An epoch covers every item exactly once; the last batch of a
    bucket may be smaller. The order depends only on (seed, epoch), so (epoch, position) resumes it.
    """

    items: Sequence[TrainItem]
    batch_size: int
    seed: int = 0
    epoch: int = 0
    position: int = 0  # batches already taken in this epoch
    _cached: tuple[int, list[list[int]]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.items:
            raise ValueError("no training items to batch")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Item indices of each batch of `epoch`, in order."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{epoch}".encode()).digest()[:8], "little") >> 1
        g = torch.Generator().manual_seed(seed)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).append(i)
        batches = []
        for bucket in sorted(by_bucket):
            idx = by_bucket[bucket]
            shuffled = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            batches += [shuffled[k:k + self.batch_size] for k in range(0, len(shuffled), self.batch_size)]
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        self._cached = (epoch, batches)
        return batches

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.epoch_batches(self.epoch))

    def next_batch(self) -> list[TrainItem]:
        batches = self.epoch_batches(self.epoch)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self.epoch_batches(self.epoch)
        batch = [self.items[i] for i in batches[self.position]]
        self.position += 1
        return batch

    def __iter__(self) -> Iterator[list[TrainItem]]:
        """Endless: batches from the current (epoch, position) on."""
        while True:
            yield self.next_batch()

    def state(self) -> tuple[int, int]:
        return self.epoch, self.position

    def load_state(self, state: tuple[int, int]) -> None:
        self.epoch, self.position = int(state[0]), int(state[1])


def collate(batch: Sequence[TrainItem]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(B, 16, h, w) latents (one bucket) and the list of (L_i, hidden) caption features."""
    if len({item.bucket for item in batch}) != 1:
        raise ValueError(f"a batch mixes buckets {sorted({item.bucket for item in batch})}")
    return torch.stack([item.latent for item in batch]), [item.caption_features for item in batch]
