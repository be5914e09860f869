"""Saving a DiT with LoRAs merged (`zimage_core.lora.save_merged_dit`): what the file holds and who can read it.

Locks in, on the tiny DiT with real key names and two LoRAs of different formats (musubi split q/k/v at 0.8, the
ComfyUI trainer's fused qkv + norm diffs + bias diffs at −0.5), for every layout × dtype that is allowed:
- reloaded by our `load_dit`, the output equals the in-memory `apply_loras(..., MERGED)` output: fp32 ≤ 1e-6;
  bf16 / fp16 / fp8 within 4·u of their unit roundoff u (2⁻⁸, 2⁻¹¹, 2⁻⁴), and every stored weight within the
  rounding bound of its dtype (fp8: also half a subnormal step of its per-tensor scale);
- the input DiT is bit-identical afterwards, also when it carries runtime LoRA deltas (they are not merged);
- ComfyUI 0.3.75 takes the ComfyUI file as UNETLoader does (its own model detection, scaled-fp8 marker included)
  with a strict `load_state_dict` into its NextDiT, and NextDiT's output equals ours (≤ 1e-5);
- diffusers 0.42.1 `ZImageTransformer2DModel.from_pretrained` takes the folder (one file and sharded), no key
  missing or unexpected, and its output equals ours (≤ 1e-5);
- at the real 6B size the keys and shapes written are those of the real files' manifests;
- a failure mid-write leaves nothing; an existing output is refused; memory stays near one tensor, not a model.
Breaks on: a ΔW not computed as MERGED mode does, a wrong q/k/v split or key name, an fp8 scale ComfyUI cannot
load, a writer that copies the state dict, an output that overwrites or half-exists after an error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import comfy_host
from lora_fixtures import Fmt, write_lora
from zimage_core import load_dit
from zimage_core.config import Z_IMAGE_6B
from zimage_core.dit import ZImageDiT
from zimage_core.keymaps import DiTLayout
from zimage_core.lora import ApplyMode, MergedDtype, apply_loras, read_lora, save_merged_dit
from zimage_core.lora import merge as merge_module
from zimage_fixtures import TINY, comfy_state_dict, diffusers_dit, diffusers_forward, inputs, manifest, rel_err

UNIT_ROUNDOFF = {MergedDtype.FP32: 2.0**-24, MergedDtype.BF16: 2.0**-8, MergedDtype.FP16: 2.0**-11,
                 MergedDtype.FP8: 2.0**-4}  # half an ulp relative to the value: 23, 7, 10, 3 mantissa bits
FP32_BOUND = 1e-6
PARITY_BOUND = 1e-5  # our DiT vs ComfyUI's NextDiT / diffusers' transformer on the same weights (fp32)
REPO = Path(__file__).resolve().parent.parent
CASES = [(layout, dtype) for layout in DiTLayout for dtype in MergedDtype
         if not (layout is DiTLayout.DIFFUSERS and dtype is MergedDtype.FP8)]


def output_bound(dtype: MergedDtype) -> float:
    """Storage rounding of relative size ≤ u per weight moves the tiny DiT's output by ≈ 1.4–1.8·u (measured);
    4·u leaves room without hiding a wrong ΔW (the LoRAs move the output by > 50·u for every dtype but fp8)."""
    return FP32_BOUND if dtype is MergedDtype.FP32 else 4 * UNIT_ROUNDOFF[dtype]


def x_in():
    return inputs(2, [7, 12], 8, 8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    save_file(comfy_state_dict(diffusers_dit(seed=3).state_dict()), d / "dit.safetensors")
    write_lora(Fmt.MUSUBI, d / "musubi.safetensors", seed=1)
    write_lora(Fmt.COMFY_TRAINER, d / "trainer.safetensors", seed=2)
    write_lora(Fmt.AI_TOOLKIT, d / "runtime.safetensors", seed=5)
    write_lora(Fmt.DIFFUSION_PIPE, d / "pipe.safetensors", seed=6)
    return d


@pytest.fixture(scope="module")
def loras(files):
    return [(read_lora(files / "musubi.safetensors"), 0.8), (read_lora(files / "trainer.safetensors"), -0.5)]


@pytest.fixture(scope="module")
def reference(files, loras):
    """(base output, MERGED-mode output, MERGED-mode state dict), from apply.py's own merge, fp32."""
    dit = load_dit(files / "dit.safetensors", dtype=torch.float32)
    with torch.no_grad():
        base = dit(*x_in())
        applied = apply_loras(dit, loras, ApplyMode.MERGED)
        merged_sd = {k: v.clone() for k, v in dit.state_dict().items()}
        out = dit(*x_in())
        applied.remove()
    return base, out, merged_sd


def fresh_dit(files, dtype=torch.float32):
    return load_dit(files / "dit.safetensors", dtype=dtype)


def out_path(tmp_path, layout: DiTLayout, dtype: MergedDtype):
    return tmp_path / (f"merged_{dtype.value}.safetensors" if layout is DiTLayout.COMFY else f"merged_{dtype.value}")


# ------------------------------------------------------------------------------------ reloaded by load_dit


@pytest.mark.parametrize("layout,dtype", CASES, ids=lambda v: v.value)
def test_reloaded_output_equals_merged_mode(layout, dtype, files, loras, reference, tmp_path):
    base_out, expected, merged_sd = reference
    out = save_merged_dit(fresh_dit(files), loras, out_path(tmp_path, layout, dtype), layout, dtype,
                          max_shard_bytes=3_000_000)
    back = load_dit(out, dtype=torch.float32)
    with torch.no_grad():
        got = back(*x_in())
    err, moved = rel_err(got, expected), rel_err(base_out, expected)
    print(f"{layout.value} {dtype.value}: output rel err {err:.2e} (bound {output_bound(dtype):.1e}); "
          f"the LoRAs move it {moved:.1e}")
    assert moved > 0.05 and err <= output_bound(dtype)
    u = UNIT_ROUNDOFF[dtype]
    for key, w in back.state_dict().items():
        ref = merged_sd[key]
        floor = ref.abs().max() / 448 * 2.0**-10 if dtype is MergedDtype.FP8 else 2.0**-25  # half a subnormal step
        assert ((w - ref).abs() <= torch.clamp(u * ref.abs(), min=floor) + 1e-12).all(), key
    meta = json.loads(read_metadata(out)["zimage_merged_loras"])
    assert meta == [{"name": "musubi.safetensors", "strength": 0.8, "format": "musubi", "modules": 14},
                    {"name": "trainer.safetensors", "strength": -0.5, "format": "comfy",
                     "modules": len(loras[1][0].patches)}]


def read_metadata(out):
    from zimage_core.sources import open_source

    return open_source(out, component="transformer").metadata


def test_input_dit_is_unchanged_and_runtime_deltas_are_not_merged(files, loras, reference, tmp_path):
    dit = fresh_dit(files)
    runtime = apply_loras(dit, [(read_lora(files / "runtime.safetensors"), 1.0)], ApplyMode.RUNTIME)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    deltas = {n: m.delta for n, m in dit.named_modules() if getattr(m, "delta", None) is not None}
    assert deltas, "the runtime LoRA must have set Linear.delta callables"
    with torch.no_grad():
        runtime_out = dit(*x_in())
    out = save_merged_dit(dit, loras, tmp_path / "m.safetensors", dtype=MergedDtype.FP32)
    assert before.keys() == dit.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items()), "the input DiT must not change"
    assert {n: m.delta for n, m in dit.named_modules() if getattr(m, "delta", None) is not None} == deltas
    with torch.no_grad():
        assert torch.equal(dit(*x_in()), runtime_out)
        got = load_dit(out, dtype=torch.float32)(*x_in())
    runtime.remove()
    assert rel_err(got, reference[1]) <= FP32_BOUND, "merged from the base parameters, not with the runtime LoRA"


# ------------------------------------------------------------------------------------------- ComfyUI 0.3.75


@pytest.fixture(scope="module")
def comfy_base(tmp_path_factory):
    """The tiny DiT with ComfyUI's own t_embedder width at dim 256 (min(dim, 1024) = 256, not 1024), so that the
    file fits ComfyUI's NextDiT exactly (as tests/test_dit_parity.py builds it)."""
    sd = comfy_state_dict(diffusers_dit(seed=3).state_dict())
    g = torch.Generator().manual_seed(4)
    dim = TINY["dim"]
    for key, shape in (("t_embedder.mlp.0.weight", (dim, 256)), ("t_embedder.mlp.0.bias", (dim,)),
                       ("t_embedder.mlp.2.weight", (dim, dim)), ("t_embedder.mlp.2.bias", (dim,))):
        sd[key] = torch.randn(shape, generator=g) / (16 if len(shape) == 2 else 10)
    path = tmp_path_factory.mktemp("comfy") / "dit.safetensors"
    save_file(sd, path)
    return path


def comfy_nextdit(path):
    """The file read as ComfyUI's UNETLoader reads it (load_torch_file, model detection with the file's metadata,
    which pops the scaled-fp8 marker and picks the fp8 ops), the Z-Image settings detection fills only at dim 3840
    set to the tiny size, then a strict load into the NextDiT."""
    comfy_host.import_comfy()
    import comfy.model_detection
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    config = comfy.model_detection.model_config_from_unet(sd, "", metadata=metadata)
    config.unet_config.update(n_heads=TINY["n_heads"], n_kv_heads=TINY["n_kv_heads"], axes_dims=TINY["axes_dims"],
                              axes_lens=TINY["axes_lens"], rope_theta=256.0, ffn_dim_multiplier=8 / 3, multiple_of=2,
                              z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "").diffusion_model
    model.load_state_dict(config.process_unet_state_dict(sd), strict=True)
    return model.eval()


@pytest.mark.parametrize("dtype", list(MergedDtype), ids=lambda v: v.value)
def test_comfyui_loads_the_file_and_agrees(dtype, comfy_base, files, tmp_path):
    """(The trainer LoRA adapts t_embedder at our width, which ComfyUI's tiny NextDiT lacks: diffusion-pipe's here.)"""
    loras = [(read_lora(files / "musubi.safetensors"), 0.8), (read_lora(files / "pipe.safetensors"), -0.5)]
    out = save_merged_dit(load_dit(comfy_base, dtype=torch.float32), loras, tmp_path / "z.safetensors", dtype=dtype)
    model = comfy_nextdit(out)
    fp8 = {n for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert bool(fp8) == (dtype is MergedDtype.FP8)
    ours = load_dit(out, dtype=torch.float32)
    x, t, caps = inputs(1, [7], 16, 16, seed=5)
    with torch.no_grad():
        want = -model(x, 1 - t, torch.stack(caps), num_tokens=7)  # ComfyUI passes σ = 1 − t and returns −v
        got = ours(x, t, caps)
        if dtype is MergedDtype.FP8:
            # ComfyUI 0.3.75's scaled-fp8 Linear is built in fp8 whole, bias included, so it casts the file's bf16
            # biases to fp8 (unscaled) as it loads them: the one difference, done here to our copy too.
            for m in ours.modules():
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    m.bias.copy_(m.bias.to(torch.float8_e4m3fn).float())
            fp8_biases = rel_err(got, want)
            got = ours(x, t, caps)
    err = rel_err(got, want)
    print(f"ComfyUI {dtype.value}: {len(fp8)} fp8 tensors; NextDiT vs ours {err:.2e}"
          + (f" (before ComfyUI's fp8 cast of the biases {fp8_biases:.2e})" if dtype is MergedDtype.FP8 else ""))
    assert err <= PARITY_BOUND


# ----------------------------------------------------------------------------------------- diffusers 0.42.1


@pytest.mark.parametrize("shard_bytes", [merge_module.DEFAULT_SHARD_BYTES, 3_000_000], ids=["one-file", "shards"])
def test_diffusers_from_pretrained_takes_the_folder(shard_bytes, files, loras, reference, tmp_path):
    from diffusers import ZImageTransformer2DModel

    out = save_merged_dit(fresh_dit(files), loras, tmp_path / "transformer", DiTLayout.DIFFUSERS, MergedDtype.FP32,
                          max_shard_bytes=shard_bytes)
    names = sorted(p.name for p in out.iterdir())
    if shard_bytes == merge_module.DEFAULT_SHARD_BYTES:
        assert names == ["config.json", "diffusion_pytorch_model.safetensors"]
    else:
        assert len(names) > 4 and "diffusion_pytorch_model.safetensors.index.json" in names
        assert all(re.fullmatch(r"diffusion_pytorch_model-000\d\d-of-000\d\d\.safetensors", n)
                   for n in names if n not in ("config.json", "diffusion_pytorch_model.safetensors.index.json"))
    model, info = ZImageTransformer2DModel.from_pretrained(out, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == ([], [], [])
    err = rel_err(diffusers_forward(model.float().eval(), *x_in()), reference[1])
    print(f"diffusers ({len(names)} files) vs merged mode: {err:.2e}")
    assert err <= PARITY_BOUND


# ------------------------------------------------------------------------------------- the real 6B layout


@pytest.mark.parametrize("layout", list(DiTLayout), ids=lambda v: v.value)
def test_6b_keys_and_shapes_are_the_real_files(layout):
    """Planned from a meta-device 6B model (no data): the keys and shapes of the real Comfy-Org / Tongyi files."""
    with torch.device("meta"):
        dit = ZImageDiT(Z_IMAGE_6B)
    entries = merge_module.plan_entries(dit, layout, MergedDtype.BF16)
    real = manifest(f"keys_dit_zimage_{layout.value}.txt")
    assert {e.key: e.shape for e in entries} == real
    assert len(entries) == len(real)
    fp8 = merge_module.plan_entries(dit, DiTLayout.COMFY, MergedDtype.FP8) if layout is DiTLayout.COMFY else []
    for e in fp8:
        if e.key.endswith(".scale_weight"):
            assert real[e.key.removesuffix("scale_weight") + "weight"] and e.shape == ()
        elif e.key != "scaled_fp8":
            assert real[e.key] == e.shape and (e.dtype == torch.float8_e4m3fn) == (len(e.shape) == 2 and
                                                                                   e.key.endswith(".weight"))


# -------------------------------------------------------------------------------------- atomic, no overwrite


@pytest.mark.parametrize("layout", list(DiTLayout), ids=lambda v: v.value)
def test_a_failure_mid_write_leaves_nothing(layout, files, loras, tmp_path, monkeypatch):
    real = merge_module._Merger.tensor
    calls = []

    def failing(self, entry):
        calls.append(entry.key)
        if len(calls) == 40:
            raise OSError("disk full (simulated)")
        return real(self, entry)

    monkeypatch.setattr(merge_module._Merger, "tensor", failing)
    target = out_path(tmp_path, layout, MergedDtype.BF16)
    with pytest.raises(OSError, match="disk full"):
        save_merged_dit(fresh_dit(files), loras, target, layout, max_shard_bytes=3_000_000)
    assert len(calls) == 40 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout", list(DiTLayout), ids=lambda v: v.value)
def test_an_existing_output_is_refused(layout, files, loras, tmp_path):
    target = out_path(tmp_path, layout, MergedDtype.BF16)
    if layout is DiTLayout.COMFY:
        target.write_bytes(b"precious")
    else:
        target.mkdir()  # even an empty folder
    with pytest.raises(FileExistsError, match=re.escape(str(target))):
        save_merged_dit(fresh_dit(files), loras, target, layout)
    assert sorted(tmp_path.iterdir()) == [target]
    assert layout is not DiTLayout.COMFY or target.read_bytes() == b"precious"


@pytest.mark.parametrize("out,layout,dtype,message", [
    ("m.ckpt", DiTLayout.COMFY, MergedDtype.BF16, r"m\.ckpt: .*\.safetensors file only"),
    ("m.safetensors", DiTLayout.DIFFUSERS, MergedDtype.BF16, r"diffusers layout is a folder"),
    ("transformer", DiTLayout.DIFFUSERS, MergedDtype.FP8, r"transformer: fp8 .*diffusers.* reads no fp8"),
    ("m.safetensors", DiTLayout.COMFY, "fp4", r"'fp4' is not a valid MergedDtype"),
    ("no/such/m.safetensors", DiTLayout.COMFY, MergedDtype.BF16, r"the folder .*no/such does not exist"),
])
def test_bad_options_are_named(out, layout, dtype, message, files, loras, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        save_merged_dit(fresh_dit(files), loras, tmp_path / out, layout, dtype)
    assert list(tmp_path.iterdir()) == []


def test_a_lora_for_another_model_is_refused_before_writing(files, tmp_path):
    from lora_fixtures import write_lumina2

    with pytest.raises(ValueError, match="another model"):
        save_merged_dit(fresh_dit(files), [(read_lora(write_lumina2(tmp_path / "l2.safetensors")), 1.0)],
                        tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["l2.safetensors"]


# ------------------------------------------------------------------------------------------------- memory

# Run in a fresh interpreter: glibc's allocator set to return every block ≥ 128 KiB to the OS when freed, so that
# resident memory follows the live tensors (not the heap's history), without changing this process's allocator.
_MEASURE = """
import ctypes, json, re, sys, torch
from zimage_core import load_dit
from zimage_core.lora import MergedDtype, read_lora, save_merged_dit
from zimage_core.lora import merge
ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, no dynamic raise
dit_path, lora_path, out, hoard = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "hoard"
if hoard:  # the control: a writer that makes every tensor first, then writes
    real = merge.write_safetensors
    def hoarding(path, entries, values, metadata):
        held = {e.key: values(e).clone() for e in entries}
        return real(path, entries, lambda e: held[e.key], metadata)
    merge.write_safetensors = hoarding
def status(field):
    return int(re.search(rf"^{field}:\\s+(\\d+) kB", open("/proc/self/status").read(), re.M).group(1)) * 1024
dit, loras = load_dit(dit_path, dtype=torch.bfloat16), [(read_lora(lora_path), 0.8)]
save_merged_dit(dit, loras, out + ".warm-up.safetensors", dtype=MergedDtype.FP32)  # first-call allocations
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
start = status("VmRSS")
save_merged_dit(dit, loras, out, dtype=MergedDtype.FP32)
print(json.dumps({"grew": status("VmHWM") - start, "total": sum(4 * p.numel() for p in dit.parameters()),
                  "largest": max(4 * p.numel() for p in dit.parameters())}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets /proc/self/status VmHWM (glibc)")
def test_memory_stays_near_one_tensor(files, tmp_path):
    """Peak resident memory while saving grows by far less than the output. Every output tensor is a new allocation
    here (a bf16 DiT saved as fp32): a writer holding them all adds the whole file (≈ 26 MB; the control run with
    such a writer must show it, or the measurement means nothing), a streaming one about its largest tensor (1 MB),
    the ΔW temporaries and scratch."""
    runs = {}
    for mode in ("stream", "hoard"):
        proc = subprocess.run([sys.executable, "-c", _MEASURE, str(files / "dit.safetensors"),
                               str(files / "musubi.safetensors"), str(tmp_path / f"{mode}.safetensors"), mode],
                              capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    total = runs["stream"]["total"]
    print(f"peak grew {runs['stream']['grew'] / 1e6:.2f} MB streaming, {runs['hoard']['grew'] / 1e6:.2f} MB holding "
          f"every tensor, writing {total / 1e6:.1f} MB (largest tensor {runs['stream']['largest'] / 1e6:.1f} MB)")
    assert runs["hoard"]["grew"] > total / 2, "the measurement must see a writer that holds the whole model"
    assert runs["stream"]["grew"] < total / 4
