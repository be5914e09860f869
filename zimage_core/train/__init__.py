"""LoRA training for Z-Image: data, timesteps, loss, network and loop (plain PyTorch, no ComfyUI).

    items = build_items(read_folder("photos", trigger="zxq"), vae, text_encoder, resolutions=(512,), cache_dir=c)
    result = train_lora(dit, items, TrainConfig(steps=1000, rank=16, output_dir="out", name="zxq"))
"""

from .config import BaseMode, LRSchedule, OptimizerKind, TrainConfig
from .data import (
    BucketBatches,
    ImageCaption,
    TrainItem,
    bucket_size,
    build_items,
    class_caption,
    collate,
    empty_caption_features,
    images_from_tensor,
    load_pixels,
    read_folder,
)
from .ema import LoraEMA
from .loop import TrainResult, train_lora
from .lora_net import TrainableLora, TrainTargets
from .loss import differential_guidance_target, flow_matching_loss, predicted_velocity
from .plot import loss_curve
from .previews import OnPreview, Previews, preview_sampler
from .timesteps import NoiseBias, TimestepSampling, loss_weights, sample_sigmas

__all__ = ["BaseMode", "BucketBatches", "ImageCaption", "LRSchedule", "NoiseBias", "OptimizerKind", "TimestepSampling",
           "TrainConfig", "TrainItem", "TrainResult", "TrainTargets", "TrainableLora", "bucket_size", "build_items",
           "class_caption", "collate", "differential_guidance_target", "empty_caption_features", "flow_matching_loss",
           "images_from_tensor", "load_pixels", "loss_curve", "loss_weights", "LoraEMA", "OnPreview", "Previews",
           "preview_sampler", "predicted_velocity", "read_folder", "sample_sigmas",
           "train_lora"]
