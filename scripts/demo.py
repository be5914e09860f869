"""Demo of the core engine on a tiny RANDOM-WEIGHT DiT (not a real model; real weights can't be bundled).

Writes the model in the official sharded layout (transformer/ shards + index), inspects it with the
CLI, loads it with `load_dit` and runs one DiT forward at a 256x256 image size.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from zimage_core import DiTConfig, DiTLayout, ZImageDiT, load_dit  # noqa: E402
from zimage_core.keymaps import from_canonical, join_key, split_key  # noqa: E402

OUT = ROOT / "demo_out" / "Z-Image-tiny-RANDOM-WEIGHTS"
TINY = DiTConfig(dim=256, n_layers=2, n_refiner_layers=2, n_heads=2, cap_feat_dim=64, ffn_dim=682,
                 t_embed_dim=1024, adaln_dim=256)


def write_official_layout(model: ZImageDiT, folder: Path, n_shards: int = 2) -> None:
    tensors = {}
    for key, value in model.state_dict().items():
        module, leaf = split_key(key)
        for name, target in from_canonical(module, DiTLayout.DIFFUSERS):
            tensors[join_key(name, leaf)] = value.chunk(target.parts)[target.part].contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    keys, weight_map = sorted(tensors), {}
    for i in range(n_shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k] for k in keys[i::n_shards]}, folder / name, metadata={"note": "random demo weights"})
        weight_map.update({k: name for k in keys[i::n_shards]})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def main() -> None:
    torch.manual_seed(0)
    model = ZImageDiT(TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    write_official_layout(model, OUT / "transformer")
    print(f"wrote a tiny random-weight DiT in the official layout: {OUT}")
    subprocess.run([sys.executable, "-m", "zimage_core", "inspect", str(OUT)], check=True, cwd=ROOT)
    dit = load_dit(OUT, device="cpu", dtype=torch.float32)
    x = torch.randn(1, 16, 32, 32)  # a 256x256 image's latent
    with torch.no_grad():
        v = dit(x, torch.tensor([0.5]), [torch.randn(12, TINY.cap_feat_dim)])
    print(f"DiT forward: v {tuple(v.shape)} {v.dtype}, mean {v.mean():.4f}, std {v.std():.4f} (t = 1 − σ = 0.5)")


if __name__ == "__main__":
    main()
