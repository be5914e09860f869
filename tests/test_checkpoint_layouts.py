"""Every DiT layout users hold loads to the same model, streamed, strictly, with fp8 kept or dequantised.

Locks in: layout detection from headers (official shards given as model root, transformer folder,
index or first shard; a plain diffusers-named file as musubi saves; ComfyUI single files with or
without `model.diffusion_model.` and `norm_final.weight`, and the DiT part of an all-in-one
checkpoint; legacy scaled fp8; comfy_quant fp8),
the fused/split qkv rename table, zero-copy streaming into the final storage, and the fp8 weight
format (kept in float8 with its scale, upcast per matmul). Breaks if a layout is misdetected, a key
is renamed wrongly, a weight is copied twice, or fp8 scales are applied wrongly.
"""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from zimage_core import DiTLayout, QuantFormat, WeightFormat, load_dit, plan_dit
from zimage_core import checkpoint as ckpt
from zimage_fixtures import (
    comfy_quant_state_dict,
    comfy_state_dict,
    dequantised,
    diffusers_dit,
    inputs,
    rel_err,
    scaled_fp8_state_dict,
    write_sharded,
)


@pytest.fixture(scope="module")
def weights():
    sd = diffusers_dit(seed=7).state_dict()
    return sd, comfy_state_dict(sd)


@pytest.fixture(scope="module")
def files(weights, tmp_path_factory):
    sd, comfy = weights
    d = tmp_path_factory.mktemp("layouts")
    write_sharded(sd, d / "official")
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, d / "musubi_full_finetune_bf16.safetensors")
    save_file(comfy, d / "z_image_comfy.safetensors")
    save_file({f"model.diffusion_model.{k}": v for k, v in comfy.items()}, d / "z_image_prefixed.safetensors")
    save_file({k: v for k, v in comfy.items() if k != "norm_final.weight"}, d / "z_image_no_norm_final.safetensors")
    save_file({**{f"model.diffusion_model.{k}": v for k, v in comfy.items()},  # ComfyUI all-in-one checkpoint
               "text_encoders.qwen3_4b.transformer.model.norm.weight": torch.ones(64),
               "vae.decoder.conv_in.weight": torch.zeros(512, 16, 3, 3)}, d / "z_image_all_in_one.safetensors")
    save_file(scaled_fp8_state_dict(comfy), d / "z_image_scaled_fp8.safetensors")
    save_file(comfy_quant_state_dict(comfy), d / "z_image_comfy_quant.safetensors")
    return d


def state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("scale_weight")}


@pytest.mark.parametrize("rel,layout", [
    ("official", DiTLayout.DIFFUSERS),
    ("official/transformer", DiTLayout.DIFFUSERS),
    ("official/transformer/diffusion_pytorch_model.safetensors.index.json", DiTLayout.DIFFUSERS),
    ("official/transformer/diffusion_pytorch_model-00001-of-00003.safetensors", DiTLayout.DIFFUSERS),
    ("z_image_comfy.safetensors", DiTLayout.COMFY),
    ("z_image_prefixed.safetensors", DiTLayout.COMFY),
    ("z_image_no_norm_final.safetensors", DiTLayout.COMFY),
    ("z_image_all_in_one.safetensors", DiTLayout.COMFY),
])
def test_fp32_layouts_load_bit_identical(files, weights, rel, layout):
    assert plan_dit(files / rel).layout is layout
    got = state(load_dit(files / rel, dtype=torch.float32))
    want = {k: v for k, v in weights[1].items() if k != "norm_final.weight"}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_first_shard_alone_finds_its_siblings_without_an_index(files, weights, tmp_path):
    for f in (files / "official/transformer").glob("*-of-*.safetensors"):
        (tmp_path / f.name).symlink_to(f)
    got = state(load_dit(tmp_path / "diffusion_pytorch_model-00001-of-00003.safetensors", dtype=torch.float32))
    assert all(torch.equal(got[k], v) for k, v in weights[1].items() if k != "norm_final.weight")


def test_bf16_diffusers_file_casts_exactly(files, weights):
    got = state(load_dit(files / "musubi_full_finetune_bf16.safetensors", dtype=torch.float32))
    assert all(torch.equal(got[k], v.to(torch.bfloat16).float()) for k, v in weights[1].items() if k in got)
    bf16 = load_dit(files / "musubi_full_finetune_bf16.safetensors", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_streaming_maps_or_reads_each_tensor_into_its_parameter(files, monkeypatch):
    """On the CPU a tensor kept as stored is a zero-copy view of the file mapping; one that must be
    fused (the official split q/k/v) is read straight into row blocks of its final storage."""
    read_targets, mapped = [], []
    real_read, real_map = ckpt.read_into, ckpt.map_tensor
    monkeypatch.setattr(ckpt, "read_into", lambda f, info, out: read_targets.append(out.data_ptr()) or
                        real_read(f, info, out))
    monkeypatch.setattr(ckpt, "map_tensor", lambda m, info: mapped.append(t := real_map(m, info)) or t)
    model = load_dit(files / "official", dtype=torch.float32)
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" and not p.requires_grad for p in params.values())
    qkv = {n: p for n, p in params.items() if n.endswith("qkv.weight")}
    assert len(read_targets) == 3 * len(qkv)  # three row blocks each, read in place
    assert {p.data_ptr() for p in qkv.values()} <= set(read_targets)
    assert {p.data_ptr() for n, p in params.items() if n not in qkv} == {t.data_ptr() for t in mapped}


def test_large_tensor_read_in_two_halves_is_exact(tmp_path):
    """Tensors over SPLIT_READ_BYTES are read by two threads; every byte lands where it belongs."""
    from zimage_core.safetensors_file import SPLIT_READ_BYTES, read_header, read_into

    big = torch.randn(SPLIT_READ_BYTES // 4 + 12345, generator=torch.Generator().manual_seed(0))
    save_file({"small": torch.arange(3.0), "big": big}, tmp_path / "big.safetensors")
    info = read_header(tmp_path / "big.safetensors").tensors["big"]
    with open(tmp_path / "big.safetensors", "rb") as f:
        assert torch.equal(read_into(f, info, torch.empty_like(big)), big)


def test_mapped_weights_are_copy_on_write(files, tmp_path):
    """Changing a loaded weight in place (as a merged LoRA will) never writes to the checkpoint file."""
    path = tmp_path / "z.safetensors"
    path.write_bytes((files / "z_image_comfy.safetensors").read_bytes())
    before = path.read_bytes()
    model = load_dit(path, dtype=torch.float32)
    model.layers[0].feed_forward.w1.weight.add_(1.0)
    del model
    assert path.read_bytes() == before


def test_peak_memory_is_the_weights_plus_one_tensor(tmp_path):
    """In a fresh process, loading a ~150 MB fp32 checkpoint raises peak RSS by ≤ 1.1× its bytes."""
    code = f"""
import resource, torch
from safetensors.torch import save_file
import zimage_fixtures as zf
sd = zf.comfy_state_dict(zf.diffusers_dit(seed=0, dim=512, n_heads=4, n_layers=8, cap_feat_dim=512).state_dict())
save_file(sd, "{tmp_path}/big.safetensors"); nbytes = sum(v.numel() * v.element_size() for v in sd.values())
del sd, zf
import gc; gc.collect()
def hwm(): return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
def rss(): return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024
open('/proc/self/clear_refs', 'w').write('5')  # reset VmHWM to the current RSS
base = rss()
from zimage_core import load_dit
m = load_dit("{tmp_path}/big.safetensors", dtype=torch.float32)
print(nbytes, hwm() - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": "tests:.", "PATH": "/usr/bin:/bin"}).stdout.split()
    nbytes, peak = int(out[0]), int(out[1])
    assert nbytes > 100e6
    assert peak <= 1.1 * nbytes, f"peak RSS rose by {peak / nbytes:.2f}x the checkpoint bytes"


@pytest.mark.parametrize("name,quant", [("z_image_scaled_fp8.safetensors", QuantFormat.SCALED_FP8),
                                        ("z_image_comfy_quant.safetensors", QuantFormat.COMFY_QUANT)])
def test_fp8_files_kept_in_fp8_or_dequantised(files, name, quant):
    from safetensors.torch import load_file

    stored = load_file(files / name)
    assert plan_dit(files / name).quant is quant
    full = load_dit(files / name, dtype=torch.float32)
    assert all(torch.equal(full.state_dict()[k], v) for k, v in dequantised(stored).items() if k != "norm_final.weight")
    kept = load_dit(files / name, dtype=torch.float32, weight_format=WeightFormat.FP8)
    qkv = kept.layers[0].attention.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(qkv.weight.view(torch.uint8), stored["layers.0.attention.qkv.weight"].view(torch.uint8))
    scale_key = "layers.0.attention.qkv." + ("scale_weight" if quant is QuantFormat.SCALED_FP8 else "weight_scale")
    assert torch.equal(qkv.scale_weight, stored[scale_key].expand(qkv.weight.shape[0], 1))
    # on-the-fly upcast computes exactly what the dequantised model computes
    x, t, caps = inputs(2, [7, 45], 16, 12)
    with torch.no_grad():
        assert rel_err(kept(x, t, caps), full(x, t, caps)) <= 1e-6


def test_fp8_weight_format_quantises_per_row_on_load(files, weights):
    model = load_dit(files / "official", dtype=torch.float32, weight_format=WeightFormat.FP8)
    comfy = weights[1]
    fp8 = {n for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert fp8 == {k for k in comfy if k.endswith(("qkv.weight", "out.weight", "w1.weight", "w2.weight", "w3.weight"))
                   and not k.startswith("final_layer")}
    for name in fp8:
        mod = model.get_submodule(name.removesuffix(".weight"))
        w, s = comfy[name], mod.scale_weight
        dq = mod.weight.float() * s
        assert torch.all((dq - w).abs() <= 2**-4 * w.abs() + 2**-9 * s)  # e4m3: 3 mantissa bits, subnormal floor
    x, t, caps = inputs(1, [7], 16, 16)
    ref = load_dit(files / "official", dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(model(x, t, caps), ref(x, t, caps)) <= 0.1  # fp8 storage error on random weights


def test_bf16_compute_tracks_fp32(files):
    x, t, caps = inputs(2, [7, 45], 16, 16)
    with torch.no_grad():
        want = load_dit(files / "z_image_comfy.safetensors", dtype=torch.float32)(x, t, caps)
        got = load_dit(files / "z_image_comfy.safetensors", dtype=torch.bfloat16)(x, t, caps)
    assert got.dtype == torch.float32  # returned in the latents' dtype
    assert rel_err(got, want) <= 3e-2  # bf16 activations: 8 mantissa bits through 6 blocks


def test_fp16_compute_tracks_fp32_and_survives_overflow(files):
    """fp16 (the MPS dtype) runs on CPU too; an overflowing FFN saturates instead of turning into NaN."""
    x, t, caps = inputs(1, [7], 16, 16)
    with torch.no_grad():
        want = load_dit(files / "z_image_comfy.safetensors", dtype=torch.float32)(x, t, caps)
        half = load_dit(files / "z_image_comfy.safetensors", dtype=torch.float16)
        assert rel_err(half(x, t, caps), want) <= 1e-2  # fp16 activations: 11 mantissa bits
        half.layers[0].feed_forward.w2.weight.mul_(1e5)  # weights stay finite, outputs ~1e5 overflow fp16
        assert torch.isfinite(half(x, t, caps)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_and_fp8_track_cpu_fp32(files):
    x, t, caps = inputs(2, [7, 45], 16, 16)
    with torch.no_grad():
        want = load_dit(files / "official", dtype=torch.float32)(x, t, caps)
        for fmt in WeightFormat:
            model = load_dit(files / "official", device="cuda", dtype=torch.bfloat16, weight_format=fmt)
            got = model(x.cuda(), t.cuda(), [c.cuda() for c in caps]).cpu()
            assert rel_err(got, want) <= (3e-2 if fmt is WeightFormat.COMPUTE else 0.1)
