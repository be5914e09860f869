"""Locks in the Flux VAE: architecture and names, parity with diffusers, banded decode, loading and bad input.

- Names: `FluxVAE(FLUX_VAE)` has exactly the 244 keys and shapes of the real `ae.safetensors`, and the
  real diffusers names map onto them through `keymaps` (breaks: a renamed module, a wrong table entry).
- Parity: a tiny random AutoencoderKL (width 32, levels (1, 2, 4, 4), 16 latent channels, no quant
  convs) loaded from the BFL file and from the diffusers `vae/` folder decodes and encodes (posterior
  mode) like diffusers within max|ours − ref| / max|ref| ≤ 1e-5 (breaks: wrong order of up levels,
  padding, attention scale, upsampling phases, latent normalisation).
- Banded decode (`tile_size`) equals the whole-image decode within max |Δ| ≤ 2e-3 on [-1, 1] pixels
  (measured ~1e-5), and its peak memory stays under the bound stated in `zimage_core.vae_tiling`.
- Bad input: one clear ValueError each, raised from the headers before any tensor is read.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vae_fixtures as vf
from zimage_core import vae as vae_module
from zimage_core.keymaps import VAE_LINEAR_AS_CONV, join_key, split_key, vae_from_diffusers
from zimage_core.vae import FLUX_VAE, FluxVAE, VAEConfig, load_vae, plan_vae
from zimage_fixtures import manifest, rel_err

REPO = Path(__file__).resolve().parent.parent
PARITY = 1e-5  # max |ours − diffusers| / max |diffusers|
TILED = 2e-3  # max |banded − whole| on [-1, 1] pixels


# --- names -------------------------------------------------------------------------------------------


def test_model_has_exactly_the_keys_and_shapes_of_the_real_ae_safetensors():
    """Breaks if a module is renamed, missing or mis-shaped, or if from_key_shapes misreads the real file."""
    real = manifest("keys_vae_flux_comfy.txt")
    assert VAEConfig.from_key_shapes(real) == FLUX_VAE
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in FluxVAE(FLUX_VAE).state_dict().items()}
    assert ours == real


def test_keymaps_turn_the_real_diffusers_vae_into_the_real_ae_safetensors():
    """Breaks if a template of keymaps.VAE_DIFFUSERS_TEMPLATES is wrong (e.g. up blocks not reversed)."""
    renamed = {}
    for key, shape in manifest("keys_vae_flux_diffusers.txt").items():
        module, leaf = split_key(key)
        ours = join_key(vae_from_diffusers(module, levels=4), leaf)
        renamed[ours] = shape + (1, 1) if VAE_LINEAR_AS_CONV.match(ours) else shape
    assert renamed == manifest("keys_vae_flux_comfy.txt")


def test_the_fixture_mapping_agrees_with_the_real_files():
    """Guards the independent BFL mapping of vae_fixtures (the parity tests below rely on it)."""
    diffusers = {k: torch.empty(s, device="meta") for k, s in manifest("keys_vae_flux_diffusers.txt").items()}
    assert {k: tuple(v.shape) for k, v in vf.bfl_state_dict(diffusers).items()} == manifest("keys_vae_flux_comfy.txt")


# --- parity with diffusers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref():
    return vf.diffusers_vae(seed=0)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vae")
    sd = ref.state_dict()
    vae_dir = vf.write_diffusers(ref, d / "root")
    return {
        "bfl": vf.write_bfl(sd, d / "ae.safetensors"),
        "diffusers_folder": vae_dir,
        "diffusers_root": d / "root",
        "diffusers_file": vae_dir / "diffusion_pytorch_model.safetensors",
        "all_in_one": vf.write_bfl(sd, d / "all_in_one.safetensors", prefix="vae."),
        "sd_checkpoint": vf.write_bfl(sd, d / "first_stage.safetensors", prefix="first_stage_model."),
    }


@pytest.fixture(scope="module")
def vae(files) -> FluxVAE:
    return load_vae(files["bfl"])


@pytest.mark.parametrize("layout", ["bfl", "diffusers_folder"])
def test_decode_and_encode_match_diffusers(ref, files, layout):
    """Breaks with any architectural or normalisation difference from diffusers' AutoencoderKL."""
    model = load_vae(files[layout])
    assert (model.cfg.ch, model.cfg.ch_mult, model.cfg.z_channels) == (vf.CH, vf.CH_MULT, 16)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 6, 5, generator=g)
    got, want = model.decode(latents), vf.reference_decode(ref, latents)
    pixels = torch.rand(2, 3, 48, 40, generator=g) * 2 - 1
    enc, enc_want = model.encode(pixels), vf.reference_encode(ref, pixels)
    print(f"\n{layout}: decode rel err {rel_err(got, want):.2e}, encode rel err {rel_err(enc, enc_want):.2e}")
    assert got.dtype == enc.dtype == torch.float32
    assert got.shape == (2, 3, 48, 40) and enc.shape == (2, 16, 6, 5)
    assert rel_err(got, want) <= PARITY and rel_err(enc, enc_want) <= PARITY


@pytest.mark.parametrize("layout", ["diffusers_root", "diffusers_file", "all_in_one", "sd_checkpoint"])
def test_every_layout_loads_the_same_weights(vae, files, layout):
    """Breaks if a container prefix, a model root or the bare diffusers file is not understood."""
    other = load_vae(files[layout])
    mine, theirs = other.state_dict(), vae.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_dtypes(files, vae):
    """bf16 is allowed and still returns float32 pixels; inputs of any dtype are cast. Breaks if the output
    dtype follows the weights or a float64 input reaches the convs."""
    half = load_vae(files["bfl"], dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full, low = vae.decode(latents), half.decode(latents)
    assert full.dtype == low.dtype == torch.float32
    assert rel_err(low, full) < 0.05
    assert half.encode(full.double()).dtype == torch.float32


# --- banded decode -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tile_size, bands", [(8, 10), (24, 4), (40, 2)])
def test_tiled_decode_matches_untiled(vae, monkeypatch, tile_size, bands):
    """Breaks with per-band GroupNorm statistics, a missing or misplaced halo row, padding inside the image,
    or a wrong upsampling phase at band edges. Batch of 2: statistics are per sample."""
    seen = []
    real = vae_module.decode_in_bands
    monkeypatch.setattr(vae_module, "decode_in_bands", lambda d, z, rows: seen.append(rows) or real(d, z, rows))
    latents = torch.randn(2, 16, 10, 6, generator=torch.Generator().manual_seed(3))
    whole, banded = vae.decode(latents), vae.decode(latents, tile_size=tile_size)
    err = (banded - whole).abs().max().item()
    print(f"\ntile_size {tile_size}: max |banded − whole| {err:.2e} (pixels within ±{whole.abs().max():.2f})")
    assert seen and math.ceil(10 / seen[0]) == bands
    assert err <= TILED


_MEMORY_SCRIPT = """
import json, re, sys, torch
from zimage_core.vae import FluxVAE, VAEConfig, FLUX_VAE
import dataclasses
torch.manual_seed(0)
vae = FluxVAE(dataclasses.replace(FLUX_VAE, ch=32)).eval()
def kib(field): return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024
vae.decode(torch.randn(1, 16, 4, 4)), vae.decode(torch.randn(1, 16, 4, 4), tile_size=8)  # warm-up
z = torch.randn(1, 16, 64, 32)
peaks = {}
for tile in (None, 32):
    open('/proc/self/clear_refs', 'w').write('5')  # reset the peak-RSS mark (Linux)
    base = kib('VmRSS')
    vae.decode(z, tile_size=tile)
    peaks[str(tile)] = kib('VmHWM') - base
print(json.dumps(peaks))
"""


def test_tiled_decode_memory_bound():
    """Peak memory of a 512×256 decode (width 32) against the bound of `vae_tiling`'s docstring:
    2·c0·P + 8·c0·(t + 8)·W + 2·3·P elements (P = B·H·W pixels, t the band height, c0 the finest width),
    and well under the whole-image decode. Measured as peak RSS in a fresh process whose large
    allocations go straight to the OS (MALLOC_MMAP_THRESHOLD_), so RSS follows live tensors.
    Breaks if bands are not freed as they are consumed, or a full-resolution temporary appears."""
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    c0, t, h, w = 32, 32, 512, 256
    bound = 4 * (2 * c0 * h * w + 8 * c0 * (t + 8) * w + 6 * h * w)
    print(f"\npeak: whole {peaks['None'] / 2**20:.1f} MiB, tile_size {t}: {peaks['32'] / 2**20:.1f} MiB "
          f"(bound {bound / 2**20:.1f} MiB)")
    assert peaks["32"] <= bound
    assert peaks["32"] < 0.5 * peaks["None"]


# --- bad input ---------------------------------------------------------------------------------------


def error_of(fn, *says: str) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and all(s in message for s in says), message
    return message


@pytest.fixture(scope="module")
def bfl_sd(ref) -> dict[str, torch.Tensor]:
    return vf.bfl_state_dict(ref.state_dict())


def test_sdxl_vae_is_refused(tmp_path, reads):
    """An SD/SDXL VAE (4 latent channels, quant convs), in both layouts. Breaks if it is half-loaded or
    reported as missing keys instead of as the wrong VAE."""
    sd = vf.diffusers_vae(latent_channels=4, quant_conv=True)
    diffusers = vf.write_diffusers(sd, tmp_path / "sdxl")
    checkpoint = tmp_path / "sd15.safetensors"
    save_file({"first_stage_model." + k: v for k, v in load_file(diffusers / "diffusion_pytorch_model.safetensors")
               .items()}, checkpoint)
    for path in (diffusers, checkpoint):
        error_of(lambda p=path: load_vae(p), path.name, "is a 4-channel (SD/SDXL) VAE",
                 "16-channel Flux VAE (ae.safetensors)")
    assert reads == []


@pytest.mark.parametrize("kind, says", [
    ("dit", "a Z-Image DiT"), ("lora", "a LoRA"), ("text_encoder", "a text encoder"), ("flux", "a Flux transformer"),
])  # fmt: skip
def test_other_models_given_as_a_vae(tmp_path, reads, kind, says):
    """Breaks if a DiT, LoRA, text encoder or Flux DiT given as the VAE gets past the probe."""
    keys = {
        "dit": {"cap_embedder.1.weight": [8, 4], "x_embedder.weight": [8, 64],
                "layers.0.attention.qkv.weight": [24, 8]},
        "lora": {"diffusion_model.layers.0.attention.qkv.lora_down.weight": [4, 8],
                 "diffusion_model.layers.0.attention.qkv.lora_up.weight": [24, 4]},
        "text_encoder": {"model.layers.0.self_attn.q_proj.weight": [8, 8], "model.embed_tokens.weight": [16, 8]},
        "flux": {"double_blocks.0.img_attn.qkv.weight": [12, 4], "img_in.weight": [4, 8]},
    }[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, path)
    error_of(lambda: load_vae(path), path.name, f"this is {says}", "not a VAE")
    assert reads == []


def test_missing_unexpected_and_misshaped_keys(tmp_path, bfl_sd, reads):
    """Breaks if loading is not strict, or names the wrong key."""
    cases = {
        "missing": ({k: v for k, v in bfl_sd.items() if k != "decoder.up.0.block.1.conv2.weight"},
                    ["1 missing keys", "decoder.up.0.block.1.conv2.weight"]),
        "unexpected": ({**bfl_sd, "decoder.up.0.block.1.extra.weight": torch.zeros(1)},
                       ["1 unexpected keys", "decoder.up.0.block.1.extra.weight"]),
        "shape": ({**bfl_sd, "decoder.mid.attn_1.q.weight": torch.zeros(128, 128, 3, 3)},
                  ["shape mismatch", "decoder.mid.attn_1.q.weight: file [128, 128, 3, 3] vs model [128, 128, 1, 1]"]),
    }
    for name, (sd, says) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, path)
        error_of(lambda p=path: load_vae(p), path.name, *says)
    assert reads == []


def test_diffusers_config_with_another_normalisation_is_refused(tmp_path, ref):
    """SD3's VAE has the Flux VAE's keys and shapes but another scaling/shift: its config.json tells.
    Breaks if config.json is ignored."""
    folder = vf.write_diffusers(ref, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "scaling_factor": 1.5305, "shift_factor": 0.0609}))
    error_of(lambda: load_vae(folder), "config.json", "scaling_factor 1.5305", "Flux VAE")


def test_bad_tensors(vae):
    """Breaks if a wrong size or channel count fails deep inside a conv instead of saying what is expected."""
    error_of(lambda: vae.encode(torch.zeros(1, 3, 60, 64)), "[1, 3, 60, 64]", "multiples of 8")
    error_of(lambda: vae.encode(torch.zeros(1, 4, 64, 64)), "(B, 3, H, W)")
    error_of(lambda: vae.decode(torch.zeros(1, 4, 8, 8)), "[1, 4, 8, 8]", "(B, 16, h, w)")
    error_of(lambda: vae.decode(torch.zeros(1, 16, 8, 8), tile_size=4), "tile_size 4")


def test_plan_reads_headers_only(files, reads):
    """The plan (layout, config, checks) of a diffusers model root comes from the headers alone. Breaks if the
    `vae/` component is not found or planning reads tensor data."""
    plan = plan_vae(files["diffusers_root"])
    assert (plan.layout.value, plan.prefix, plan.config.ch_mult) == ("diffusers", "", vf.CH_MULT)
    assert reads == []
