"""Our `diffusers` LoRA output through diffusers 0.42.1's user-facing `ZImagePipeline.load_lora_weights` (peft 0.21.2).

Locks in (issue 6, LoRA hub): for every fixture format that has a diffusers form (all but DoRA and ComfyUI's
trainer, whose magnitudes and full deltas only ComfyUI's format holds), `convert_lora(..., TargetFormat.DIFFUSERS)`
saved with `save_lora` loads with `pipe.load_lora_weights(path)` without a warning (no unexpected or missing keys),
every lora_A/lora_B lands on the module it names with scaling 1 (alpha/r folded); the pipeline's transformer then
gives our DiT's output with the SOURCE file applied at run time (≤ 1e-4 rel; LoHa/LoKr, which become LoRAs by
SVD, within that plus twice the error the converter reports, and ≤ 1e-4 against our DiT with the converted file);
`set_adapters(weight 0.5)` equals our strength 0.5; a 2-step pipeline call (turbo: guidance 0, shift 3) from the
same noise and caption features gives our sampler's latents with the LoRA; and the LoRA moves the output by far
more than the tolerance. Breaks on a key diffusers or PEFT does not map, an alpha folded wrongly, a q/k/v split in
the wrong rows, or a LoRA that ends up on another module. (test_lora_convert.py checks the state dict with
`lora_state_dict` and a hand merge; this goes through the pipeline API a user calls.)
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_fixtures import Fmt, write_lora
from zimage_core import SamplerConfig, load_dit, make_noise, sample
from zimage_core.lora import ApplyMode, LoraFile, TargetFormat, apply_loras, convert_lora, read_lora, save_lora
from zimage_fixtures import TINY, comfy_state_dict, diffusers_dit, diffusers_forward, inputs, rel_err

COMFY_ONLY = {Fmt.DORA, Fmt.COMFY_TRAINER}  # convert_lora refuses these for diffusers (test_lora_convert.py)
SVD = {Fmt.LOHA, Fmt.LOKR}  # become LoRAs by truncated SVD, with a reported error
FORMATS = [f for f in Fmt if f not in COMFY_ONLY]
# fp32 on the CPU on both sides: the DiTs agree to ~1e-6 (test_dit_parity.py); PEFT computes
# scaling·B(A(x)) and we (x·downᵀ)·upᵀ·s, the same products in another rounding order (~1e-7). 1e-4 leaves room
# for the 2-step sampler (test_pipeline.py's bound for whole images) and is ~100× below the LoRA's effect.
TOL = 1e-4
CAP_DIM = TINY["cap_feat_dim"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny diffusers transformer in a ZImagePipeline (caption features are passed in, so it needs no text
    encoder, tokenizer or VAE), and our DiT loaded from the same weights in the ComfyUI single-file layout."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    path = tmp_path_factory.mktemp("lora_diffusers") / "dit.safetensors"
    reference = diffusers_dit(seed=3)
    save_file(comfy_state_dict(reference.state_dict()), path)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=reference)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_dit(path, "cpu", torch.float32)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def load_quietly(pipe, path, name: str) -> list[str]:
    """`pipe.load_lora_weights(path)`; every warning diffusers, peft or Python raised meanwhile (diffusers' logger
    does not propagate to the root, so the handler goes on the library loggers)."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path), adapter_name=name)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return handler.messages + [f"{w.category.__name__}: {w.message}" for w in caught]


def assert_every_key_landed(transformer, sd: dict[str, torch.Tensor], name: str) -> int:
    """Each `transformer.<module>.lora_A/B.weight` of the file is that module's PEFT lora_A/B, bit for bit, at
    scaling 1; no other module got an adapter."""
    modules = 0
    for key, a in sd.items():
        if ".lora_A." not in key:
            continue
        module = transformer.get_submodule(key.removeprefix("transformer.").split(".lora_A.")[0])
        assert torch.equal(module.lora_A[name].weight, a), key
        assert torch.equal(module.lora_B[name].weight, sd[key.replace(".lora_A.", ".lora_B.")]), key
        assert module.scaling[name] == 1.0, (key, module.scaling[name])
        modules += 1
    wrapped = sum(1 for m in transformer.modules() if hasattr(m, "lora_A") and name in m.lora_A)
    assert wrapped == modules == len(sd) // 2, (wrapped, modules, len(sd))
    return modules


def ours_with(dit, lora: LoraFile, strength: float, fn):
    with torch.no_grad():
        applied = apply_loras(dit, [(lora, strength)], ApplyMode.RUNTIME)
        try:
            return fn()
        finally:
            applied.remove()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_load_lora_weights_takes_our_output_and_matches_ours(fmt, models, tmp_path):
    pipe, ours = models
    source = read_lora(write_lora(fmt, tmp_path / "source.safetensors", seed=13).path)
    converted = convert_lora(source, TargetFormat.DIFFUSERS)
    save_lora(converted, tmp_path / "diffusers.safetensors")
    as_saved = read_lora(tmp_path / "diffusers.safetensors")
    x, t, caps = inputs(2, [7, 12], 8, 8, cap_dim=CAP_DIM)
    base = diffusers_forward(pipe.transformer, x, t, caps)

    problems = load_quietly(pipe, tmp_path / "diffusers.safetensors", fmt.value)
    try:
        assert problems == [], problems
        n = assert_every_key_landed(pipe.transformer, load_file(tmp_path / "diffusers.safetensors"), fmt.value)
        tol = TOL + (2 * max(converted.svd_errors.values()) if fmt in SVD else 0.0)
        for strength in (1.0, 0.5):
            pipe.set_adapters([fmt.value], adapter_weights=[strength])
            theirs = diffusers_forward(pipe.transformer, x, t, caps)
            from_source = ours_with(ours, source, strength, lambda: ours(x, t, caps))
            from_converted = ours_with(ours, as_saved, strength, lambda: ours(x, t, caps))
            err, exact, moved = rel_err(from_source, theirs), rel_err(from_converted, theirs), rel_err(theirs, base)
            print(f"{fmt.value} ×{strength}: {n} modules; diffusers vs ours with the source {err:.1e} (bound "
                  f"{tol:.1e}), with the converted file {exact:.1e}; the LoRA moves the output {moved:.1e}")
            assert moved > 100 * TOL and err <= tol and exact <= TOL
        pipe.set_adapters([fmt.value], adapter_weights=[1.0])
        latents, expected = pipeline_latents(pipe, ours, source)
        print(f"{fmt.value}: 2-step pipeline latents vs our sampler {rel_err(latents, expected):.1e}")
        assert rel_err(latents, expected) <= tol
    finally:
        pipe.unload_lora_weights()
    assert torch.equal(diffusers_forward(pipe.transformer, x, t, caps), base)  # unloaded: the next test sees the base


def pipeline_latents(pipe, ours, lora: LoraFile) -> tuple[torch.Tensor, torch.Tensor]:
    """ZImagePipeline at 2 steps (guidance 0, shift 3), our caption features and noise, output_type "latent"; and our
    sampler on our DiT with the source LoRA from the same noise and captions (latents 6×8: a 48×64 image)."""
    g = torch.Generator().manual_seed(2)
    caps = [torch.randn(9, CAP_DIM, generator=g), torch.randn(5, CAP_DIM, generator=g)]
    noise = make_noise(7, (2, 16, 6, 8))
    with torch.no_grad():
        theirs = pipe(prompt_embeds=list(caps), height=48, width=64, num_inference_steps=2, guidance_scale=0.0,
                      latents=noise.clone(), output_type="latent").images
    cfg = SamplerConfig(steps=2, guidance=0.0, shift=3.0)
    return theirs, ours_with(ours, lora, 1.0, lambda: sample(ours, noise, caps, cfg))


def test_the_warning_check_sees_a_key_diffusers_cannot_place(models, tmp_path):
    """The control for `problems == []` above: one extra pair for a module the model lacks (layers.7) is reported."""
    pipe, _ = models
    source = read_lora(write_lora(Fmt.AI_TOOLKIT, tmp_path / "source.safetensors", seed=13).path)
    sd = convert_lora(source, TargetFormat.DIFFUSERS).state_dict
    sd |= {"transformer.layers.7.attention.to_q.lora_A.weight": torch.zeros(4, TINY["dim"]),
           "transformer.layers.7.attention.to_q.lora_B.weight": torch.zeros(TINY["dim"], 4)}
    save_file(sd, tmp_path / "extra.safetensors")
    try:
        problems = load_quietly(pipe, tmp_path / "extra.safetensors", "extra")
    finally:
        pipe.unload_lora_weights()
    assert len(problems) == 1, problems
    assert "unexpected keys" in problems[0] and "layers.7.attention.to_q" in problems[0], problems
