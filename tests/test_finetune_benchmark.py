"""benchmarks/finetune.py on a tiny size: a RegNetY-400MF checkpoint of one `seer pretrain` step,
exported by seer in timm's layout, fine-tuned for 3 steps on 40 labelled digits from the export
and from random init; the JSON's shape, that timm really got the exported weights, and that bad
input is one line. The benchmark's numbers themselves come from running the script."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_overrides

sys.path.insert(0, str(REPO / "benchmarks"))
import finetune  # noqa: E402


def _digits(root, train=200, test=50):
    """scikit-learn's handwritten digits (8 x 8, upscaled to 28 px) as train/ and test/ image folders."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    for i in range(train + test):
        folder = root / ("train" if i < train else "test") / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((images[i].reshape(8, 8) * 15).astype("uint8")).resize((28, 28)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def timm_export(tmp_path_factory, shard_dir):
    from seer.export import export_backbone

    # timm's RegNet has 4 stages: the smallest seer model that timm loads is RegNetY-400MF
    run = tmp_path_factory.mktemp("finetune") / "run"
    overrides = tiny_overrides(shard_dir, run, **{
        "model.backbone": "regnety_400mf", "augment.crops": "[{size: 32, count: 2, scale: [0.4, 1.0]}]",
        "train.max_steps": 1, "checkpoint.every_steps": 1, "schedule.warmup_steps": 0, "train.num_threads": 1})
    proc = subprocess.run([sys.executable, "-m", "seer", "pretrain", str(REPO / "configs" / "quickstart.yaml"),
                           *overrides], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run.parent / "timm.safetensors"
    export_backbone(run, out, fmt="timm", num_classes=10, seed=0)
    return out


def test_balanced_subset_is_seeded_and_balanced():
    labels = np.repeat(np.arange(10), 100)
    subset = finetune.balanced_subset(labels, 0.05, seed=3)
    assert np.bincount(labels[subset]).tolist() == [5] * 10
    assert np.array_equal(subset, finetune.balanced_subset(labels, 0.05, seed=3))
    assert not np.array_equal(subset, finetune.balanced_subset(labels, 0.05, seed=4))
    assert np.bincount(labels[finetune.balanced_subset(labels, 0.001, seed=0)]).tolist() == [1] * 10


@pytest.mark.slow
def test_export_loads_into_timm_with_the_pretrained_weights(timm_export):
    state = load_file(str(timm_export))
    name = json.loads(timm_export.with_suffix(".json").read_text())["timm_name"]
    assert name == "regnety_004"
    seer_model = finetune.build_model(name, "seer", timm_export, 10)
    random_model = finetune.build_model(name, "random", timm_export, 10)
    assert torch.equal(seer_model.stem.conv.weight, state["stem.conv.weight"])
    assert torch.equal(seer_model.s4.b1.conv2.conv.weight, state["s4.b1.conv2.conv.weight"])
    assert not torch.equal(random_model.stem.conv.weight, state["stem.conv.weight"])
    check = finetune.check_export(name, timm_export, 10)
    assert check["strict_load"] and check["loaded_equal_export"]
    assert not check["missing_keys"] and not check["unexpected_keys"]
    assert check["backbone_tensors_differing_from_random_init"] > check["backbone_tensors"] // 2


@pytest.mark.slow
def test_finetune_benchmark_writes_rows_for_both_inits(tmp_path, timm_export):
    data = _digits(tmp_path / "digits")
    out = tmp_path / "finetune.json"
    assert finetune.main(["--export", str(timm_export), "--data", str(data), "--fractions", "0.2", "--steps", "3",
                          "--lrs", "0.01", "0.1", "--batch-size", "16", "--out", str(out), "--no-doc",
                          "--work", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    assert [(r["labels_fraction"], r["init"]) for r in result["rows"]] == [(0.2, "seer"), (0.2, "random")]
    for row in result["rows"]:
        assert set(row) >= {"labels_fraction", "init", "top1"} and 0 <= row["top1"] <= 100
    assert len(result["runs"]) == 4 and {r["steps"] for r in result["runs"]} == {3}
    assert {r["labelled_images"] for r in result["runs"]} == {40}
    assert result["protocol"]["test_images"] == 50
    assert result["export_check"]["strict_load"]
    assert result["time"]["finetune_cpu_minutes"] > 0 and "0.2" in result["gains"]
    # the frozen probes of the same 40 labels: the export's features and raw pixels (8 x 8 digits: far above chance)
    assert [(r["labels_fraction"], r["features"]) for r in result["frozen"]] == [(0.2, "seer"), (0.2, "pixels")]
    assert next(r["top1"] for r in result["frozen"] if r["features"] == "pixels") > 50.0
    assert "seer, frozen (linear probe)" in result["table"] and "raw pixels (28 px, linear probe)" in result["table"]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert finetune.main(["--export", str(tmp_path / "missing.safetensors"), "--data", str(tmp_path),
                          "--no-doc", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("finetune.py: error:") and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--fractions", "0.01", "0.1", "--steps", "5"])
    assert exc.value.code == 2
    assert "one count per fraction" in capsys.readouterr().err
