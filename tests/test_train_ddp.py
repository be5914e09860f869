"""Multi-process training with torchrun (gloo, CPU) vs one process.

Locks in (issue 7 acceptance): 2 processes at batch 1 each give the LoRA of one process at batch 2 after 5
steps within 1e-5 relative per tensor (tests/ddp_worker.py: `train_lora` with the DiT computing in float64, the
LoRA in float32; only the order of the sums differs, as the per-item gradients are summed over ranks by one
all-reduce instead of inside one batched GEMM). The real command, `torchrun -m zimage_core train` in float32,
gives the same printed losses; its LoRA differs by up to ~1e-3 relative, because the gradients differ by ~3e-6
(fp32 summation order) and Adam's m/√v amplifies that where the momentum nearly cancels: that bound is 5e-3.
Only rank 0 prints and writes; a resume state written by 2 processes is refused by 1 (its global batch differs).
Breaks on: ranks training on the same item, gradients averaged instead of summed (or not reduced at all),
noise drawn per rank, files written by every rank.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from train_fixtures import write_cli_models
from zimage_fixtures import comfy_state_dict, diffusers_dit

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS = 5
TOLERANCE = 1e-5  # float64 compute (ddp_worker.py)
CLI_TOLERANCE = 5e-3  # float32 compute: summation order × Adam (module docstring)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    write_cli_models(root)
    photos = root / "photos"
    photos.mkdir()
    for name, colour in (("a", (200, 30, 90)), ("b", (10, 200, 10))):
        img = Image.new("RGB", (64, 64), colour)
        img.paste((250, 250, 0), (8, 8, 40, 24))
        img.save(photos / f"{name}.png")
    (photos / "a.txt").write_text("a photo of [trigger] on a red wall", encoding="utf-8")
    (photos / "b.txt").write_text("[trigger]", encoding="utf-8")
    for batch in (1, 2):
        (root / f"b{batch}.toml").write_text(f"""
steps = {STEPS}
rank = 4
learning_rate = 2e-3
batch_size = {batch}
timestep_sampling = "logit_normal"
targets = "all"
name = "ddp"
trigger = "zxq"
output_dir = "out_b{batch}"

[models]
dit = "dit.safetensors"
text_encoder = "qwen3.safetensors"
vae = "ae.safetensors"
tokenizer = "tokenizer"

[data]
folder = "photos"
resolutions = [64]
cache_dir = "cache"
""", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    single = subprocess.run([sys.executable, "-m", "zimage_core", "train", str(root / "b2.toml"), "--device", "cpu"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "zimage_core", "train",
                          str(root / "b1.toml"), "--device", "cpu"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-4000:]
    (root / "single.out").write_text(single.stdout, encoding="utf-8")
    (root / "ddp.out").write_text(ddp.stdout, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp_worker")
    dit = root / "dit.safetensors"
    save_file(comfy_state_dict(diffusers_dit(seed=3).state_dict()), dit)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    single = subprocess.run([sys.executable, str(WORKER), str(dit), str(root / "single"), "2"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER), str(dit),
                          str(root / "ddp"), "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-4000:]
    (root / "single.out").write_text(single.stdout, encoding="utf-8")
    (root / "ddp.out").write_text(ddp.stdout, encoding="utf-8")
    return root


def worst_rel_err(ours: dict, ref: dict) -> float:
    assert set(ours) == set(ref) and len(ref) > 0
    ups = [k for k in ref if k.endswith("lora_up.weight")]
    assert min(ref[k].norm().item() for k in ups) > 0  # every up-projection trained away from its zero init
    return max(((ours[k].float() - ref[k].float()).norm() / ref[k].float().norm()).item() for k in ref)


def test_two_processes_at_batch_1_equal_one_at_batch_2(worker_runs):
    ours = load_file(worker_runs / "ddp" / f"ddp_{STEPS:06d}.safetensors")
    ref = load_file(worker_runs / "single" / f"ddp_{STEPS:06d}.safetensors")
    worst = worst_rel_err(ours, ref)
    print(f"\nDDP (gloo) 2 × batch 1 vs 1 × batch 2, {STEPS} steps, float64 DiT: worst rel err {worst:.2e} over "
          f"{len(ref)} LoRA tensors")
    assert worst <= TOLERANCE
    single = (worker_runs / "single.out").read_text().split()
    ddp = (worker_runs / "ddp.out").read_text().split()
    assert ddp.count("losses") == 1  # rank 0 only
    assert [float(x) for x in ddp[1:]] == pytest.approx([float(x) for x in single[1:]], rel=1e-6)  # float32 losses
    assert not list((worker_runs / "ddp").glob("*.tmp*"))


def losses(text: str) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(r"^step \d+/\d+ loss (\S+)", text, re.M)]


def test_the_torchrun_command_trains_as_one_process(runs):
    ours = load_file(runs / "out_b1" / f"ddp_{STEPS:06d}.safetensors")
    ref = load_file(runs / "out_b2" / f"ddp_{STEPS:06d}.safetensors")
    worst = worst_rel_err(ours, ref)
    print(f"\ntorchrun -m zimage_core train, 2 × batch 1 vs 1 × batch 2, float32: worst rel err {worst:.2e}")
    assert worst <= CLI_TOLERANCE


def test_the_losses_agree_and_only_rank_0_prints(runs):
    single, ddp = losses((runs / "single.out").read_text()), losses((runs / "ddp.out").read_text())
    assert len(single) == STEPS and len(ddp) == STEPS  # one line per step: rank 1 prints nothing
    assert ddp == pytest.approx(single, rel=1e-4, abs=1e-6)  # printed with 4 decimals
    assert (runs / "ddp.out").read_text().count("lora: ") == 1


def test_a_two_process_state_is_refused_by_one_process(runs):
    state = runs / "out_b1" / f"ddp_{STEPS:06d}.state.safetensors"
    toml = runs / "b1.toml"
    toml.write_text(toml.read_text().replace(f"steps = {STEPS}", f"steps = {STEPS + 2}"), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "zimage_core", "train", str(toml), "--device", "cpu", "--resume",
                        str(state)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "2 process(es)" in r.stderr and str(state) in r.stderr
