"""Pillow or Pillow-SIMD: which PIL is detected and reported, and that the PIL and torch resize
paths give the same crops. Runs on whatever PIL is installed; CI also runs it (with
tests/test_decode.py and tests/test_crops_augment.py) in the Pillow-SIMD venv `make test-simd`
builds, where SEER_EXPECT_PILLOW_SIMD=1 makes it insist on a real Pillow-SIMD build."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import PIL
import pytest
import torch
from images import photo
from PIL import Image

from data_pipeline import crops as crops_module
from data_pipeline.crops import CropSpec, MultiCrop, decoder_info
from data_pipeline.decode import pil_build
from seer.cli import main as seer_main

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "cluster" / "pillow_simd.sh"
EXPECT_SIMD = os.environ.get("SEER_EXPECT_PILLOW_SIMD") == "1"


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def cpu_has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def test_pil_build_names_the_distribution_that_owns_the_imported_pil():
    build = pil_build()
    assert build["name"] in ("pillow", "pillow-simd") and build["version"] == PIL.__version__
    dist = importlib.metadata.distribution(build["name"])
    assert dist.version == PIL.__version__
    assert Path(str(dist.locate_file("PIL/__init__.py"))).resolve() == Path(PIL.__file__).resolve()
    assert (build["simd"] is None) == (build["name"] == "pillow")
    assert pil_build() is build  # found once per process


@pytest.mark.skipif(not EXPECT_SIMD, reason="only in the Pillow-SIMD venv (SEER_EXPECT_PILLOW_SIMD=1)")
def test_this_venv_really_runs_pillow_simd():
    build = pil_build()
    assert build["name"] == "pillow-simd", f"expected Pillow-SIMD, this venv imports {build}"
    assert ".post" in build["version"]
    assert Path(PIL.__file__).resolve().is_relative_to(Path(sys.prefix).resolve())  # the venv's own copy
    if cpu_has_avx2():
        assert build["simd"] == "avx2"
    assert decoder_info()["resizer"] == "pillow-simd" and crops_module.RESIZER == "pil"


def test_decoder_info_reports_what_the_crops_use(monkeypatch):
    info = decoder_info()
    simd = pil_build()["name"] == "pillow-simd"
    assert info["pil"].startswith("pillow-simd " if simd else "pillow ")
    assert crops_module.RESIZER == ("pil" if simd else "torch")
    assert info["resizer"] == ("pillow-simd" if simd else "torch")
    assert info["decoder"] == ("simplejpeg" if crops_module.simplejpeg is not None else "pil-draft")
    monkeypatch.setattr(crops_module, "simplejpeg", None)
    monkeypatch.setattr(crops_module, "RESIZER", "torch")
    assert decoder_info()["decoder"] == "pil-draft" and decoder_info()["simplejpeg"] is None
    assert decoder_info()["resizer"] == "torch"


def _crops(monkeypatch, data, resizer, simplejpeg, flip_p=0.5, seed=1):
    monkeypatch.setattr(crops_module, "RESIZER", resizer)
    if not simplejpeg:
        monkeypatch.setattr(crops_module, "simplejpeg", None)
    multicrop = MultiCrop([CropSpec(64, 3, (0.05, 1.0)), CropSpec(24, 3, (0.05, 0.3))], flip_p=flip_p)
    views = multicrop.from_bytes(data, torch.Generator().manual_seed(seed))
    monkeypatch.undo()
    return views


@pytest.mark.parametrize("simplejpeg", [True, False])
def test_pil_and_torch_resizers_give_the_same_crops(monkeypatch, simplejpeg):
    """Same boxes, same antialiased bilinear algorithm: equal inside to a level (PIL reads pixels
    just outside a box as filter support where torch repeats the edge: borders differ a little),
    far from crops of other boxes."""
    if simplejpeg and crops_module.simplejpeg is None:
        pytest.skip("simplejpeg not installed")
    data = jpeg(photo("astronaut.png", (900, 700)))
    pil = _crops(monkeypatch, data, "pil", simplejpeg)
    tch = _crops(monkeypatch, data, "torch", simplejpeg)
    other = _crops(monkeypatch, data, "torch", simplejpeg, seed=2)
    for a, b, c in zip(pil, tch, other):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
        same, different = (a.float() - b.float()).abs().mean(), (a.float() - c.float()).abs().mean()
        assert same < 0.6 and different > 20 * same
        inner = (a[:, 2:-2, 2:-2].float() - b[:, 2:-2, 2:-2].float()).abs()  # borders excluded
        assert inner.mean() < 0.05 and inner.max() <= 1  # measured: 0 on Pillow-SIMD, <= 1 on Pillow 13


@pytest.mark.parametrize("resizer", ["pil", "torch"])
def test_views_are_planar_and_flips_mirror(monkeypatch, resizer):
    data = jpeg(photo("coffee.png", (640, 480)))
    plain = _crops(monkeypatch, data, resizer, True, flip_p=0.0)
    flipped = _crops(monkeypatch, data, resizer, True, flip_p=1.0)
    for a, b in zip(plain, flipped):
        assert a.is_contiguous() and a.shape[0] == 3 and a.shape[1] == a.shape[2]
        assert torch.equal(a.flip(-1), b)


def test_seer_inspect_env_prints_the_stack(capsys):
    assert seer_main(["inspect", "--env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "environment"
    assert {k: info[k] for k in ("pil", "decoder", "resizer")} == {k: decoder_info()[k] for k in ("pil", "decoder", "resizer")}
    assert seer_main(["inspect"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line, no traceback


def _script(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, timeout=60)


@pytest.mark.parametrize("flags,expected", [("fpu sse4_1 avx avx2 fma", "avx2"), ("fpu sse4_1 sse4_2", "sse4")])
def test_build_target_follows_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    result = _script("target", PILLOW_SIMD_CPUINFO=str(cpuinfo), PILLOW_SIMD_ARCH="x86_64")
    assert result.returncode == 0 and result.stdout.split()[0] == expected
    assert ("-mavx2" in result.stdout) == (expected == "avx2")
    assert ("no AVX2" in result.stderr) == (expected == "sse4")


def test_build_refuses_cpus_without_sse4_or_x86_saying_why(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2\n")
    result = _script("target", PILLOW_SIMD_CPUINFO=str(cpuinfo), PILLOW_SIMD_ARCH="x86_64")
    assert result.returncode == 1 and "neither AVX2 nor SSE4.1" in result.stderr
    result = _script("target", PILLOW_SIMD_ARCH="aarch64")
    assert result.returncode == 1 and "aarch64" in result.stderr and result.stderr.count("\n") == 1


def test_script_check_and_bad_usage_are_one_clear_line(tmp_path):
    result = _script("frobnicate")
    assert result.returncode == 1 and result.stderr.startswith("pillow_simd: error: usage:")
    result = _script("check", str(tmp_path / "nope"))
    assert result.returncode == 1 and "run `make venv` first" in result.stderr and result.stderr.count("\n") == 1
    result = _script("check", str(Path(sys.prefix)))
    assert (result.returncode == 0) == (pil_build()["name"] == "pillow-simd")
