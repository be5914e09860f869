"""Every ComfyUI convention the nodes rely on, in one place (checked against ComfyUI 0.3.75's code).

- LATENT is ComfyUI's raw Flux-VAE latent `{"samples": (B, 16, H/8, W/8)}`, before the model's latent format:
  KSampler applies `latent_format.process_in` = (z − 0.1159)·0.3611 on the way in and `process_out` on the way
  out (comfy/samplers.py `CFGGuider.inner_sample`), EmptySD3LatentImage gives zeros, VAEDecode/VAEEncode take
  and give raw z. The core works in that normalised model space, so the conversion happens here, with
  ComfyUI's own `latent_formats.Flux` numbers. An all-zero latent is not shifted (ComfyUI's rule too).
- IMAGE is (B, H, W, 3) float in [0, 1]; the core's pixels are (B, 3, H, W) in [−1, 1].
- CONDITIONING is what ComfyUI's Z-Image text encoder gives (comfy/sd.py `CLIP.encode_from_tokens_scheduled`
  over `z_image.ZImageTEModel`): `[[cond (1, L, 2560) float32, {"pooled_output": None, "attention_mask":
  (1, L) long}]]`; `model_base.Lumina2.extra_conds` uses the mask to drop padding.
"""

from __future__ import annotations

from pathlib import Path

import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import folder_paths
import latent_preview
import torch

from ..zimage_core import ImageSize, Preset, SamplerConfig, WeightFormat, make_noise, preset_config
from ..zimage_core.pipeline import LATENT_CHANNELS, PIXELS_PER_LATENT, SIZE_MULTIPLE, to_unit_range

CATEGORY = "Z-Image"
ZIMAGE_DIT = "ZIMAGE_DIT"
ZIMAGE_TEXT_ENCODER = "ZIMAGE_TEXT_ENCODER"
ZIMAGE_VAE = "ZIMAGE_VAE"
WEIGHT_FORMATS = {"default": WeightFormat.COMPUTE, "fp8_e4m3fn": WeightFormat.FP8}
_FLUX = comfy.latent_formats.Flux()


def compute_dtype(dev: torch.device) -> torch.dtype:
    """bf16 on CUDA (fp16 where bf16 is unsupported), fp16 on MPS, fp32 on the CPU (as ComfyUI runs Z-Image there)."""
    if dev.type == "cuda":
        return torch.bfloat16 if mm.should_use_bf16(dev) else torch.float16
    return torch.float16 if dev.type == "mps" else torch.float32


def model_choices(folder: str, official_subfolder: str) -> list[str]:
    """Files in a ComfyUI model folder, then official diffusers roots (`<name>/` under models/diffusers) that
    have `official_subfolder` (transformer/, text_encoder/)."""
    roots = {f"{p.name}/" for base in folder_paths.get_folder_paths("diffusers") if Path(base).is_dir()
             for p in Path(base).iterdir() if (p / official_subfolder).is_dir()}
    return folder_paths.get_filename_list(folder) + sorted(roots)


def model_path(folder: str, name: str) -> Path:
    if name.endswith("/"):  # an official root from model_choices
        for base in folder_paths.get_folder_paths("diffusers"):
            if (Path(base) / name).is_dir():
                return Path(base) / name
        raise FileNotFoundError(f"no folder {name} under the diffusers model folders")
    return Path(folder_paths.get_full_path_or_raise(folder, name))


def bundled_tokenizer() -> Path:
    """ComfyUI's own Qwen tokenizer (vocab.json + merges.txt), the one its Z-Image text encoder uses."""
    import comfy.text_encoders.z_image as z_image

    return Path(z_image.__file__).resolve().parent / "qwen25_tokenizer"


def sampler_config(preset: str, steps: int, guidance: float, shift: float) -> SamplerConfig:
    """The preset, with each widget that is not at its "use the preset" value (0, −1, 0) overriding it."""
    return preset_config(Preset(preset), steps or None, None if guidance < 0 else guidance, shift or None)


def conditioning(cap: torch.Tensor) -> list:
    """One (L, D) caption → CONDITIONING exactly as ComfyUI's own Z-Image text encoder shapes it."""
    cond = cap.float().unsqueeze(0).to(mm.intermediate_device())  # (1, L, D)
    return [[cond, {"pooled_output": None, "attention_mask": torch.ones(cond.shape[:2], dtype=torch.long)}]]


def captions(conditioning: list, batch: int) -> list[torch.Tensor]:
    """CONDITIONING → one (L_i, D) caption per latent in the batch (padding dropped by the attention mask)."""
    if len(conditioning) != 1:
        raise ValueError(f"Z-Image Sampler takes one conditioning entry, got {len(conditioning)} (combined or "
                         "area conditioning is not supported; use ComfyUI's KSampler for those)")
    cond, extra = conditioning[0]  # (b, L, D)
    mask = extra.get("attention_mask")
    caps = [c if mask is None else c[mask[i].bool()] for i, c in enumerate(cond)]
    if len(caps) not in (1, batch):
        raise ValueError(f"conditioning batch {len(caps)} does not match the latent batch {batch}")
    return caps * batch if len(caps) == 1 else caps


def sampler_input(latent: dict) -> torch.Tensor:
    """The LATENT to sample from, in model space; refuses what the sampler would otherwise silently ignore."""
    if "noise_mask" in latent:
        raise ValueError("this LATENT has a noise mask (inpainting); Z-Image Sampler does not support masks yet")
    return latent_to_model(latent["samples"])


def latent_to_model(samples: torch.Tensor) -> torch.Tensor:
    check_latent_size(samples)
    return samples.float() if not torch.count_nonzero(samples) else _FLUX.process_in(samples.float())


def model_to_latent(x: torch.Tensor) -> torch.Tensor:
    return _FLUX.process_out(x.float()).to(mm.intermediate_device())


def check_latent_size(samples: torch.Tensor) -> None:
    if samples.ndim != 4 or samples.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"LATENT of shape {list(samples.shape)}: Z-Image needs a (B, {LATENT_CHANNELS}, "
                         f"H/{PIXELS_PER_LATENT}, W/{PIXELS_PER_LATENT}) Flux latent")
    ImageSize(samples.shape[3] * PIXELS_PER_LATENT, samples.shape[2] * PIXELS_PER_LATENT)  # sides: multiples of 16


def noise(latent: dict, seed: int) -> torch.Tensor:
    """ComfyUI's noise for `seed` (comfy.sample.prepare_noise), per-index when the latent has a batch_index."""
    if "batch_index" in latent:
        import comfy.sample

        return comfy.sample.prepare_noise(latent["samples"].float(), seed, latent["batch_index"])
    return make_noise(seed, latent["samples"].shape)


def progress(steps: int, dev: torch.device):
    """on_step for the core: ComfyUI's progress bar with a latent preview of the current latent."""
    bar = comfy.utils.ProgressBar(steps)
    previewer = latent_preview.get_previewer(dev, _FLUX)

    def on_step(i: int, n: int, x: torch.Tensor) -> None:
        preview = previewer.decode_latent_to_preview_image("JPEG", x) if previewer else None
        bar.update_absolute(i, n, preview)

    return on_step


def interrupted() -> bool:
    """should_stop for the core: raises ComfyUI's own InterruptProcessingException, so the run ends as
    "interrupted" rather than as an error; never returns True."""
    mm.throw_exception_if_processing_interrupted()
    return False


def image_to_pixels(image: torch.Tensor) -> torch.Tensor:
    """IMAGE → pixels, centre-cropped to multiples of 16 (as ComfyUI's VAEEncode crops to multiples of 8)."""
    h, w = (side // SIZE_MULTIPLE * SIZE_MULTIPLE for side in image.shape[1:3])
    if not h or not w:
        raise ValueError(f"image of {image.shape[2]}x{image.shape[1]} pixels: Z-Image needs at least "
                         f"{SIZE_MULTIPLE}x{SIZE_MULTIPLE}")
    top, left = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2
    return image[:, top:top + h, left:left + w, :3].movedim(-1, 1).float() * 2 - 1


def pixels_to_image(pixels: torch.Tensor) -> torch.Tensor:
    return to_unit_range(pixels).movedim(1, -1).to(mm.intermediate_device())
