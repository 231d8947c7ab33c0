"""Exports of 2-rank FSDP checkpoints in seer, torchvision and timm layouts: strict loads into
torchvision's and timm's own models of the same architecture, same features as seer's backbone,
seeded classifiers (byte-identical exports), MoCo v3's momentum encoder, refused inputs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cluster.local import torchrun_command
from conftest import REPO, tiny_overrides
from seer.eval.features import load_backbone
from seer.export import export_backbone

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
VIT_OVERRIDES = {
    "model.backbone": "vit_micro_patch16",
    "model.kwargs": "{img_size: 32}",
    "method.name": "mocov3",
    "method.mocov3.projector_hidden": 32,
    "method.mocov3.predictor_hidden": 32,
    "method.mocov3.out_dim": 16,
    "augment.crops": "[{size: 32, count: 1, scale: [0.2, 1.0]}, {size: 32, count: 1, scale: [0.2, 1.0]}]",
    "optim.name": "adamw",
    "optim.lr": 0.05,
}


def _two_rank_run(tmp_path_factory, shard_dir, name, **extra):
    run = tmp_path_factory.mktemp(name) / "run"
    overrides = tiny_overrides(shard_dir, run, **{"train.max_steps": 2, "parallel.strategy": "fsdp", **extra})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(torchrun_command(2, QUICKSTART, overrides), capture_output=True, text=True, cwd=REPO,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "step_00000002" / "extra_rank1.pt").is_file()  # saved on 2 ranks
    return run


def _digit_folders(root):
    """scikit-learn's handwritten digits as an image-folder tree with train/ and val/ parts."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    for i in range(200):
        folder = root / ("train" if i < 150 else "val") / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((images[i].reshape(8, 8) * 15).astype("uint8")).resize((32, 32)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def regnet_run(tmp_path_factory, shard_dir):
    # timm's RegNet has 4 stages: the smallest such seer model is torchvision's RegNetY-400MF. The
    # kNN probe runs during training too, its features sharded over the 2 FSDP ranks.
    labelled = _digit_folders(tmp_path_factory.mktemp("digits"))
    run = _two_rank_run(tmp_path_factory, shard_dir, "regnet", **{
        "model.backbone": "regnety_400mf", "eval.every_steps": 1, "eval.data": labelled,
        "eval.train_images": 150, "eval.test_images": 50, "checkpoint.every_steps": 1,
        # SyncBN: every rank holds the same BatchNorm running statistics, so the checkpoint's are the probe's
        "parallel.syncbn_group_size": -1})
    probes = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval/knn_k20" in line]
    assert [p["step"] for p in probes] == [0, 1, 2]
    # the probe of the FSDP-sharded model equals a single-process `seer eval` of the saved checkpoint
    from seer.eval.runner import evaluate

    for probe in probes[1:]:  # step 0 has no checkpoint
        checkpoint = run / "checkpoints" / f"step_{probe['step']:08d}"
        offline = evaluate("knn", checkpoint, labelled, train_limit=150, test_limit=50, size=32, cache_dir=None,
                           ks=(20,))
        assert offline["results"]["k20"] == pytest.approx(probe["eval/knn_k20"], abs=1e-6)
        assert offline["effective_rank"] == pytest.approx(probe["eval/effective_rank"], rel=1e-4)
    return run


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, shard_dir):
    return _two_rank_run(tmp_path_factory, shard_dir, "vit", **VIT_OVERRIDES)


def _images(size):
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_regnet_export_loads_strict_into_torchvision_and_timm(tmp_path, regnet_run):
    import timm
    from torchvision.models import regnet_y_400mf

    ours = load_backbone(regnet_run).model.eval()
    x = _images(32)
    with torch.no_grad():
        expected = ours(x)

    tv_file = tmp_path / "tv.safetensors"
    export_backbone(regnet_run, tv_file, fmt="torchvision", num_classes=7)
    tv = regnet_y_400mf(num_classes=7)
    tv.load_state_dict(load_file(tv_file), strict=True)
    tv.fc = torch.nn.Identity()

    timm_file = tmp_path / "timm.safetensors"
    export_backbone(regnet_run, timm_file, fmt="timm", num_classes=7)
    tm = timm.create_model("regnety_004", num_classes=7)  # seer's TIMM_NAMES["regnety_400mf"]
    tm.load_state_dict(load_file(timm_file), strict=True)
    with torch.no_grad():
        assert (tv.eval()(x) - expected).abs().max().item() <= 1e-5
        timm_features = tm.eval().forward_head(tm.forward_features(x), pre_logits=True)
        assert (timm_features - expected).abs().max().item() <= 1e-5
    # what was exported evaluates back to the same backbone, whichever layout
    for path in (tv_file, timm_file):
        with torch.no_grad():
            assert (load_backbone(path).model.eval()(x) - expected).abs().max().item() <= 1e-6
    assert json.loads(timm_file.with_suffix(".json").read_text())["format"] == "timm"


@pytest.mark.slow
def test_vit_export_loads_strict_into_timm_and_torchvision(tmp_path, vit_run):
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

    ours = load_backbone(vit_run).model.eval()
    x = _images(32)
    with torch.no_grad():
        expected = ours(x)

    timm_file = tmp_path / "timm.safetensors"
    export_backbone(vit_run, timm_file, fmt="timm", num_classes=5)
    tm = TimmViT(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=5)
    tm.load_state_dict(load_file(timm_file), strict=True)

    tv_file = tmp_path / "tv.safetensors"
    export_backbone(vit_run, tv_file, fmt="torchvision", num_classes=5)
    tv = TorchvisionViT(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=256,
                        num_classes=5)
    tv.load_state_dict(load_file(tv_file), strict=True)
    tv.heads = torch.nn.Identity()
    with torch.no_grad():
        assert (tm.eval().forward_head(tm.forward_features(x), pre_logits=True) - expected).abs().max().item() <= 1e-5
        assert (tv.eval()(x) - expected).abs().max().item() <= 1e-5

    # MoCo v3: the momentum encoder on request, which is not the base encoder after training
    momentum_file = tmp_path / "momentum.safetensors"
    export_backbone(vit_run, momentum_file, fmt="timm", num_classes=0, encoder="momentum")
    base, momentum = load_file(timm_file), load_file(momentum_file)
    assert set(momentum) == set(base) - {"head.weight", "head.bias"}
    assert any(not torch.equal(momentum[k], base[k]) for k in momentum)


@pytest.mark.slow
def test_classifier_is_seeded_and_exports_are_byte_identical(tmp_path, regnet_run):
    first, second, other = (tmp_path / f"{n}.safetensors" for n in ("a", "b", "c"))
    for path, seed in ((first, 0), (second, 0), (other, 1)):
        proc = subprocess.run([sys.executable, "-m", "seer", "export", str(regnet_run), "--out", str(path),
                               "--format", "timm", "--num-classes", "10", "--seed", str(seed)],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert first.read_bytes() == second.read_bytes()
    assert not torch.equal(load_file(first)["head.fc.weight"], load_file(other)["head.fc.weight"])
    assert torch.equal(load_file(first)["s1.b1.conv1.conv.weight"], load_file(other)["s1.b1.conv1.conv.weight"])


def test_seer_64gf_matches_timm_regnety_640():
    import timm

    from seer.models import create
    from seer.models.regnet import TIMM_NAMES

    assert TIMM_NAMES["regnety_64gf"] == "regnety_640"
    for name in ("regnety_64gf", "regnety_256gf"):
        with torch.device("meta"):
            ours = sum(p.numel() for p in create(name).parameters())
            theirs = sum(p.numel() for p in timm.create_model(TIMM_NAMES[name], num_classes=0).parameters())
        assert ours == theirs
    assert ours == 1_272_156_138


def test_backbone_refuses_pickles_and_foreign_files(tmp_path):
    pickle_file = tmp_path / "backbone.pt"
    torch.save({"w": torch.zeros(1)}, pickle_file)
    proc = subprocess.run([sys.executable, "-m", "seer", "eval", "knn", str(pickle_file), "--data", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to load" in lines[0] and "safetensors" in lines[0]
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="no 'seer' metadata"):
        load_backbone(foreign)
