"""`python -m zimage_core lora inspect|convert|merge` on tiny files (tests/lora_fixtures.py, tests/zimage_fixtures.py).

Locks in: `inspect` reports each fixture's format, ranks, alphas, adapter kinds and module list as the fixture wrote
them, and its coverage of the 6B DiT's Linear layers per group (counts worked out by hand below: the tiny DiT has 2
main layers and, as the 6B, 2 + 2 refiners); `convert` writes a file `read_lora` takes in the target format and
prints one summary line (plus the SVD error of a lossy step); `merge` gives the same DiT as `apply_loras(MERGED)`,
with FILE:STRENGTH split at the last colon (paths may hold colons, no strength means 1.0); bad input exits 2 with
one line naming the file or value, before the DiT is loaded where it can. Breaks on a changed JSON field, a
coverage count off by the fused-qkv rule, a strength parsed from the wrong colon, or a traceback for bad input.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from lora_fixtures import Fmt, targets, write_lora
from zimage_core import cli, load_dit
from zimage_core.cli_lora import parse_lora_arg, stored_dtype
from zimage_core.config import WeightFormat
from zimage_core.lora import ApplyMode, LoraFormat, TargetFormat, apply_loras, read_lora
from zimage_core.lora.report import report_lines
from zimage_fixtures import comfy_state_dict, diffusers_dit, inputs, rel_err, scaled_fp8_state_dict

# attention (q, k, v, out), feed_forward, adaLN, refiners, embedders, final layer
TOTAL_6B = 30 * 4 + 30 * 3 + 30 + 2 * 8 + 2 * 7 + 4 + 2


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(capsys, *argv: str) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), (rc, out, err)
    return err


# ------------------------------------------------------------------------------------------------------ inspect


def _groups(**covered: int) -> dict:
    totals = {"attention": 120, "feed_forward": 90, "adaLN": 30, "noise_refiner": 16, "context_refiner": 14,
              "embedders": 4, "final_layer": 2}
    return {g: {"covered": covered.get(g, 0), "total": t} for g, t in totals.items()}


INSPECT = {  # fixture: (format, adapter kinds, coverage groups, other modules)
    Fmt.MUSUBI: (LoraFormat.MUSUBI, ["lora"], _groups(attention=8, feed_forward=6), 0),
    # every Linear: fused qkv counts as q, k and v; norm diffs are not Linear layers
    Fmt.COMFY_TRAINER: (LoraFormat.COMFY, ["diff", "diff_b", "lora"], _groups(
        attention=8, feed_forward=6, adaLN=2, noise_refiner=16, context_refiner=14, embedders=4, final_layer=2), None),
    Fmt.LOKR: (LoraFormat.LYCORIS, ["lokr"], _groups(attention=8, feed_forward=6, adaLN=2), 0),
    Fmt.DORA: (LoraFormat.PEFT, ["lora"], _groups(attention=8, feed_forward=6, adaLN=2), 0),
}


@pytest.mark.parametrize("fmt", list(INSPECT), ids=lambda f: f.value)
def test_inspect_reports_the_fixture(fmt, tmp_path, capsys):
    written = write_lora(fmt, tmp_path / f"{fmt.value}.safetensors", rank=4)
    rc, out, err = run(capsys, "lora", "inspect", written.path)
    assert rc == 0 and err == ""
    r = json.loads(out)
    fmt_value, kinds, groups, other = INSPECT[fmt]
    assert (r["name"], r["format"], r["adapter_kinds"], r["dora"]) == (
        written.path.name, fmt_value.value, kinds, fmt is Fmt.DORA)
    assert r["ranks"] == ([4] if fmt is not Fmt.LOKR else read_lora(written.path).ranks)
    assert r["alphas"] == ([] if written.alpha is None else [written.alpha])
    assert set(r["targets"]) >= {t.name for t in targets(fmt)}
    assert r["coverage"]["groups"] == groups
    covered = sum(g["covered"] for g in groups.values())
    assert (r["coverage"]["covered"], r["coverage"]["total"]) == (covered, TOTAL_6B)
    assert r["coverage"]["fraction"] == round(covered / TOTAL_6B, 4)
    if other is not None:
        assert r["coverage"]["other_modules"] == other
    else:  # the trainer's norm diffs: modules that are not Linear layers
        norms = {k.rsplit(".", 1)[0] for k in written.keys if k.endswith(".diff")}
        assert r["coverage"]["other_modules"] == len(norms)
        assert r["coverage"]["other_modules"] > 0
    assert (r["unmatched"], r["metadata"], r["coverage"]["outside_6b"]) == ([], {}, [])


def test_inspect_names_unmatched_keys_and_metadata(tmp_path, capsys):
    written = write_lora(Fmt.AI_TOOLKIT, tmp_path / "a.safetensors")
    sd = {k: v for k, v in read_lora(written.path).patches[0].adapter.tensors.items()}
    sd = {f"diffusion_model.layers.0.attention.to_q.lora_{'A' if k == 'down' else 'B'}.weight": v
          for k, v in sd.items()}
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 4)
    save_file(sd, tmp_path / "m.safetensors", metadata={"ss_output_name": "mine"})
    r = json.loads(run(capsys, "lora", "inspect", tmp_path / "m.safetensors")[1])
    assert r["unmatched"] == ["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    assert r["metadata"] == {"ss_output_name": "mine"} and r["targets"] == ["layers.0.attention.to_q"]
    assert r["coverage"]["groups"]["attention"]["covered"] == 1


def test_inspect_bad_input_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nothing.safetensors"
    assert "nothing.safetensors: no such file" in one_error_line(capsys, "lora", "inspect", missing)
    save_file({"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "flux.safetensors")
    assert "flux.safetensors: a Flux LoRA" in one_error_line(capsys, "lora", "inspect", tmp_path / "flux.safetensors")


# ------------------------------------------------------------------------------------------------------ convert


@pytest.mark.parametrize("to,expected", [(TargetFormat.COMFY, LoraFormat.COMFY),
                                         (TargetFormat.DIFFUSERS, LoraFormat.PEFT),
                                         (TargetFormat.MUSUBI, LoraFormat.MUSUBI)], ids=lambda v: v.value)
def test_convert_writes_the_target_format(to, expected, tmp_path, capsys):
    src = write_lora(Fmt.MUSUBI, tmp_path / "src.safetensors", rank=4).path
    out = tmp_path / "out.safetensors"
    rc, stdout, err = run(capsys, "lora", "convert", src, out, "--to", to.value)
    assert rc == 0 and err == ""
    assert read_lora(out).format is expected
    (line,) = stdout.splitlines()
    assert line.startswith(f"{out}: musubi → {to.value}, 14 modules, ") and "rank " in line and "alpha " in line


def test_convert_reports_the_svd_error(tmp_path, capsys):
    src = write_lora(Fmt.LOKR, tmp_path / "k.safetensors").path
    rc, stdout, _ = run(capsys, "lora", "convert", src, tmp_path / "d.safetensors", "--to", "diffusers",
                        "--lokr-rank", "3")
    lines = stdout.splitlines()
    assert rc == 0 and len(lines) > 1 and "rank 3" in lines[0]
    assert all(re.search(r"lokr → LoRA rank 3 of \d+ by SVD, relative Frobenius error \d\.\d\de-?\d+", x)
               for x in lines[1:])


def test_convert_bad_input(tmp_path, capsys):
    src = write_lora(Fmt.MUSUBI, tmp_path / "src.safetensors").path
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    assert "taken.safetensors: already exists" in one_error_line(
        capsys, "lora", "convert", src, tmp_path / "taken.safetensors", "--to", "comfy")
    assert "lokr_rank must be a positive rank, got 0" in one_error_line(
        capsys, "lora", "convert", src, tmp_path / "o.safetensors", "--to", "diffusers", "--lokr-rank", "0")
    assert ".safetensors only" in one_error_line(capsys, "lora", "convert", src, tmp_path / "o.pt", "--to", "comfy")
    with pytest.raises(SystemExit) as e:  # argparse's own exit 2 for an unknown choice
        cli.main(["lora", "convert", str(src), str(tmp_path / "o.safetensors"), "--to", "kohya"])
    assert e.value.code == 2 and "invalid TargetFormat value: 'kohya'" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_merge") / "dit.safetensors"
    save_file(comfy_state_dict(diffusers_dit(seed=3).state_dict()), path)
    return path


def test_merge_equals_merged_mode(dit_file, tmp_path, capsys):
    a = write_lora(Fmt.MUSUBI, tmp_path / "a.safetensors", seed=1).path
    odd = tmp_path / "my:lora.safetensors"  # a colon in the file name
    write_lora(Fmt.AI_TOOLKIT, odd, seed=2)
    out = tmp_path / "merged.safetensors"
    rc, stdout, err = run(capsys, "lora", "merge", "--dit", dit_file, "--lora", f"{a}:0.8", "--lora", odd,
                          "--lora", f"{odd}:-0.25", "--out", out, "--dtype", "fp32")
    assert rc == 0 and err == ""
    assert stdout == (f"{out}: dit.safetensors + a.safetensors at 0.8, my:lora.safetensors at 1, "
                      "my:lora.safetensors at -0.25 (comfy layout, fp32)\n")
    dit = load_dit(dit_file, dtype=torch.float32)
    x = inputs(2, [7, 12], 8, 8)
    with torch.no_grad():
        apply_loras(dit, [(read_lora(a), 0.8), (read_lora(odd), 1.0), (read_lora(odd), -0.25)], ApplyMode.MERGED)
        assert rel_err(load_dit(out, dtype=torch.float32)(*x), dit(*x)) <= 1e-6


def test_merge_diffusers_layout(dit_file, tmp_path, capsys):
    a = write_lora(Fmt.MUSUBI, tmp_path / "a.safetensors", seed=1).path
    rc, stdout, _ = run(capsys, "lora", "merge", "--dit", dit_file, "--lora", a, "--out", tmp_path / "transformer",
                        "--layout", "diffusers", "--max-shard-gb", "0.004")
    assert rc == 0 and stdout.endswith("(diffusers layout, bf16)\n")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()


@pytest.mark.parametrize("value,expected", [
    ("a.safetensors", ("a.safetensors", 1.0)),
    ("a.safetensors:0.5", ("a.safetensors", 0.5)),
    ("a.safetensors:-1e-1", ("a.safetensors", -0.1)),
    ("a.safetensors:", ("a.safetensors", 1.0)),
    ("C:\\loras\\a.safetensors", ("C:\\loras\\a.safetensors", 1.0)),
    ("C:\\loras\\a.safetensors:2", ("C:\\loras\\a.safetensors", 2.0)),
    ("dir:x/a.safetensors:0.7", ("dir:x/a.safetensors", 0.7)),
])
def test_lora_argument_splits_at_the_last_colon(value, expected):
    path, strength = parse_lora_arg(value)
    assert (str(path), strength) == expected


def test_merge_bad_input_is_one_line_before_loading(dit_file, tmp_path, capsys, monkeypatch):
    import zimage_core.checkpoint

    def no_load(*a, **k):
        raise AssertionError("the DiT must not be loaded for bad input")

    monkeypatch.setattr(zimage_core.checkpoint, "load_dit", no_load)
    a = write_lora(Fmt.MUSUBI, tmp_path / "a.safetensors").path
    merge = ["lora", "merge", "--dit", dit_file, "--out"]
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    assert "taken.safetensors: already exists" in one_error_line(capsys, *merge, tmp_path / "taken.safetensors",
                                                                 "--lora", a)
    assert f"--lora {a}:abc: strength 'abc' is not a number" in one_error_line(
        capsys, *merge, tmp_path / "o.safetensors", "--lora", f"{a}:abc")
    assert "strength nan is not a finite number" in one_error_line(
        capsys, *merge, tmp_path / "o.safetensors", "--lora", f"{a}:nan")
    assert "missing.safetensors: no such file" in one_error_line(
        capsys, *merge, tmp_path / "o.safetensors", "--lora", tmp_path / "missing.safetensors:0.5")
    assert "reads no fp8" in one_error_line(capsys, *merge, tmp_path / "t", "--lora", a, "--layout", "diffusers",
                                            "--dtype", "fp8_e4m3fn")
    assert list(p.name for p in tmp_path.iterdir() if p.name.startswith(("o", "t."))) == []


def test_merge_refuses_a_lora_given_as_the_dit(tmp_path, capsys):
    a = write_lora(Fmt.MUSUBI, tmp_path / "a.safetensors").path
    err = one_error_line(capsys, "lora", "merge", "--dit", a, "--lora", a, "--out", tmp_path / "o.safetensors")
    assert "a.safetensors: this is a LoRA" in err


def test_merge_loads_the_dit_as_stored(dit_file, tmp_path):
    """Merging rounds once: a bf16 file is loaded in bf16 (file-mapped), an fp8 file kept fp8, fp32 in fp32."""
    sd = comfy_state_dict(diffusers_dit(seed=3).state_dict())
    save_file({k: v.bfloat16() for k, v in sd.items()}, tmp_path / "bf16.safetensors")
    save_file(scaled_fp8_state_dict(sd), tmp_path / "fp8.safetensors")
    assert stored_dtype(dit_file) == (torch.float32, WeightFormat.COMPUTE)
    assert stored_dtype(tmp_path / "bf16.safetensors") == (torch.bfloat16, WeightFormat.COMPUTE)
    assert stored_dtype(tmp_path / "fp8.safetensors") == (torch.bfloat16, WeightFormat.FP8)


def test_inspect_text_reports_format_rank_alpha_targets(tmp_path):
    """The LoRA Inspect node's text (the same report as `lora inspect`, as lines)."""
    written = write_lora(Fmt.MUSUBI, tmp_path / "style.safetensors", rank=4, alpha=2.0)
    report = "\n".join(report_lines(read_lora(written.path)))
    print(report)
    assert "style.safetensors: a Z-Image LoRA, musubi format" in report
    assert "modules: 14 (lora ×14)" in report and "rank: 4; alpha: 2" in report
    assert "layers 0–1: attention.to_k, attention.to_out.0, attention.to_q, attention.to_v, feed_forward.w1" in report
    assert "unmatched keys: 0" in report
