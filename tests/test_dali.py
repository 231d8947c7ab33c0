"""The DALI backend (CPU mode, no GPU needed): the torch path's view structure, rank sharding,
exact resume from DALI's checkpoint, corrupt members of foreign shards kept away from DALI, new
shards in online mode, and a real pretraining run killed and resumed."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install 'seer[dali]')")

from cluster.local import torchrun_command  # noqa: E402
from conftest import REPO, sigkill_after_checkpoint, tiny_overrides  # noqa: E402
from data_pipeline.augment import color_augment  # noqa: E402
from data_pipeline.crops import MultiCrop  # noqa: E402
from data_pipeline.dali_loader import DaliLoader, resume_dali_state  # noqa: E402
from data_pipeline.dali_pipeline import build_pipeline, view_recipes  # noqa: E402
from data_pipeline.dali_shards import prepare_shards  # noqa: E402
from data_pipeline.quarantine import QuarantineLog, rank_log_path  # noqa: E402
from data_pipeline.shard_index import ensure_index  # noqa: E402
from data_pipeline.shards import ShardWriter  # noqa: E402
from data_pipeline.stream import ShardStream, make_loader  # noqa: E402
from images import encode, photo, photo_jpeg, random_binary, truncated  # noqa: E402
from seer.config import load_config  # noqa: E402
from seer.engine.checkpoint import load_model_weights, resolve_checkpoint  # noqa: E402
from seer.engine.data import color_specs, crop_specs  # noqa: E402
from seer.methods import build_method  # noqa: E402

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BAD_KEYS = ("handmade-000001", "handmade-000003")


def tiny_config(shards: Path, run_dir: Path, **extra):
    return load_config(QUICKSTART, tiny_overrides(shards, run_dir, **extra))


def loader_for(cfg, shards: Path, tmp: Path, **kwargs) -> DaliLoader:
    args = dict(batch_size=cfg.train.batch_size, mode="fixed", seed=cfg.seed, num_threads=1, cache_dir=tmp / "cache")
    return DaliLoader(shards, crop_specs(cfg), color_specs(cfg), cfg.augment.flip_p, **{**args, **kwargs})


def write_small_shards(folder: Path, shards: int = 4, per_shard: int = 10) -> None:
    """Real JPEGs of ~90 px cut from the bundled photos (small: DALI decodes them quickly)."""
    rng = random.Random(0)
    names = ("astronaut.png", "coffee.png", "chelsea.png")
    for s in range(shards):
        with ShardWriter(folder, f"small-{s:06d}") as writer:
            for _ in range(per_shard):
                img = photo(rng.choice(names))
                left, top = rng.randrange(img.width // 2), rng.randrange(img.height // 2)
                box = (left, top, left + img.width // 2, top + img.height // 2)
                data = encode(img.crop(box).resize((rng.randrange(72, 112), rng.randrange(72, 112))))
                writer.write(writer.next_key(), data, "jpg", {"source": "test"})


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """40 real JPEGs in 4 plain shards."""
    out = tmp_path_factory.mktemp("small")
    write_small_shards(out)
    return out


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory, small_dir) -> Path:
    """Plain tars without a manifest (as img2dataset leaves them), plus one written by hand
    holding a truncated JPEG and a member of random bytes named .jpg."""
    out = tmp_path_factory.mktemp("foreign")
    for tar in sorted(small_dir.glob("*.tar")):
        shutil.copy(tar, out / tar.name)
    members = [photo_jpeg(size=(64, 48)), truncated(photo_jpeg(size=(64, 48))), photo_jpeg("coffee.png", (48, 64)),
               random_binary(), photo_jpeg("chelsea.png", (64, 64))]
    with tarfile.open(out / "handmade.tar", "w") as tar:
        for i, data in enumerate(members):
            info = tarfile.TarInfo(f"handmade-{i:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def test_views_have_the_torch_paths_structure(tmp_path, small_dir):
    cfg = tiny_config(small_dir, tmp_path)
    stream = ShardStream(small_dir, MultiCrop(crop_specs(cfg), flip_p=cfg.augment.flip_p), mode="fixed", seed=0)
    batch = next(iter(make_loader(stream, cfg.train.batch_size, 0)))
    colors = color_specs(cfg)
    torch_views = [color_augment(v, colors[i], torch.Generator().manual_seed(i)) for i, v in enumerate(batch["views"])]
    dali_views = next(loader_for(cfg, small_dir, tmp_path))["views"]
    assert len(dali_views) == len(torch_views) == 4
    for d, t in zip(dali_views, torch_views):
        assert (d.shape, d.dtype, d.device, d.stride()) == (t.shape, t.dtype, t.device, t.stride())
        assert d.is_contiguous() and torch.isfinite(d).all()
        assert -3.0 < float(d.mean()) < 3.0 and 0.1 < float(d.std()) < 3.0  # normalised, not [0, 255]


@pytest.mark.slow
def test_ranks_split_every_epoch(tmp_path, small_dir):
    cfg = tiny_config(small_dir, tmp_path, **{"train.batch_size": 20})  # 40 samples: one batch per rank per epoch
    loaders = [loader_for(cfg, small_dir, tmp_path, rank=r, world_size=2) for r in range(2)]
    for _ in range(2):
        keys = [next(loader)["keys"] for loader in loaders]
        assert not set(keys[0]) & set(keys[1])
        assert len(set(keys[0]) | set(keys[1])) == 40


@pytest.mark.slow
def test_resume_from_dali_checkpoint_continues_exactly(tmp_path, small_dir):
    cfg = tiny_config(small_dir, tmp_path)
    straight = loader_for(cfg, small_dir, tmp_path)
    batches = []
    for i in range(6):
        batches.append(next(straight))
        if i == 2:
            state = json.loads(json.dumps(straight.state_dict()))  # what a checkpoint stores survives JSON too
    resumed = loader_for(cfg, small_dir, tmp_path, state=resume_dali_state([state], 0, 1))
    for expected in batches[3:]:
        got = next(resumed)
        assert got["keys"] == expected["keys"]
        assert all(torch.equal(a, b) for a, b in zip(got["views"], expected["views"]))  # same augmentation too
    # another rank count: a fresh generation of the pinned corpus, not a replay of the old one
    other = [{**state, "rank": r, "world_size": 2} for r in range(2)]  # as two ranks would have saved
    fresh = resume_dali_state(other, 0, 1)
    assert "checkpoint" not in fresh and fresh["generation"] == 1 and fresh["pin"] == other[0]["pin"]
    restarted = loader_for(cfg, small_dir, tmp_path, state=fresh)
    assert restarted.generation == 1 and next(restarted)["keys"] != batches[0]["keys"]


@pytest.mark.slow
def test_corrupt_members_of_foreign_shards_never_reach_dali(tmp_path, foreign_dir):
    cfg = tiny_config(foreign_dir, tmp_path)
    handmade = foreign_dir / "handmade.tar"
    # what the check prevents: DALI itself stops on the bad member
    raw = build_pipeline([str(handmade)], [str(ensure_index(handmade, tmp_path))], view_recipes(crop_specs(cfg), color_specs(cfg)),
                         0.5, batch_size=5, num_threads=1)
    with pytest.raises(RuntimeError):
        raw.run()
    quarantine = tmp_path / "quarantine.jsonl"
    loader = loader_for(cfg, foreign_dir, tmp_path, quarantine_path=quarantine)
    seen = set()
    for _ in range(2 * 43 // cfg.train.batch_size):  # 43 good samples: about 2 epochs
        seen.update(next(loader)["keys"])
    assert loader.total_skipped == 2 and len(seen) == 43
    assert not seen & set(BAD_KEYS) and {"handmade-000000", "handmade-000004"} <= seen
    assert sorted(e["key"] for e in QuarantineLog(quarantine).entries()) == list(BAD_KEYS)
    again = prepare_shards(foreign_dir, sorted(foreign_dir.glob("*.tar")), cache_dir=tmp_path / "cache",
                           max_pixels=cfg.data.max_pixels, quarantine_path=quarantine)
    assert sum(r.skipped for r in again) == 2 and len(list(QuarantineLog(quarantine).entries())) == 2  # checked once


@pytest.mark.slow
def test_online_mode_resumes_and_reads_a_new_shard_within_one_poll(tmp_path, small_dir):
    folder = tmp_path / "drop"
    folder.mkdir()
    tars = sorted(small_dir.glob("*.tar"))
    for tar in tars[:2]:
        shutil.copy(tar, folder / tar.name)
    cfg = tiny_config(folder, tmp_path, **{"train.batch_size": 8})
    loader = loader_for(cfg, folder, tmp_path, mode="online", poll_seconds=0.5)
    next(loader)
    state = resume_dali_state([loader.state_dict()], 0, 1)
    expected = next(loader)["keys"]
    resumed = loader_for(cfg, folder, tmp_path, mode="online", poll_seconds=60, state=state)
    assert next(resumed)["keys"] == expected  # online, same shards, same ranks: exact
    shutil.copy(tars[2], folder / tars[2].name)
    time.sleep(0.6)
    new = {k for _ in range(2) for k in next(loader)["keys"] if k.startswith(tars[2].stem)}
    assert new and loader.generation == 1
    assert tars[2].name in loader.state_dict()["shards"]
    restarted = loader_for(cfg, folder, tmp_path, mode="online", poll_seconds=60, state=state)
    assert restarted.generation == 1  # the shard list changed while it was down: new seeds
    assert restarted.state_dict()["shards"][0] == tars[2].name  # the new shard is read first


def _pretrain(overrides: list[str], ranks: int = 1) -> subprocess.Popen:
    command = ([sys.executable, "-m", "seer", "pretrain", QUICKSTART, *overrides] if ranks == 1
               else torchrun_command(ranks, QUICKSTART, overrides))
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_pretrain_with_dali_lowers_the_loss_and_resumes_exactly_after_sigkill(tmp_path, foreign_dir):
    """On the folder holding the corrupt shard: the run goes on; killed after its step-4
    checkpoint and resumed, it ends with bitwise the same weights as an uninterrupted run, so
    it read the same samples with the same augmentation."""
    common = {"train.max_steps": 8, "checkpoint.every_steps": 2, "train.deterministic": True,
              "data.backend": "dali", "data.mode": "fixed"}
    straight = tmp_path / "straight"
    proc = _pretrain(tiny_overrides(foreign_dir, straight, **common))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    losses = _losses(straight)
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])

    killed = tmp_path / "killed"
    overrides = tiny_overrides(foreign_dir, killed, **common)
    sigkill_after_checkpoint(_pretrain(overrides), killed, 4)
    proc = _pretrain(overrides)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    def weights(run_dir):
        model = build_method(load_config(QUICKSTART, tiny_overrides(foreign_dir, run_dir, **common)))
        load_model_weights(resolve_checkpoint(run_dir), model)
        return model.state_dict()

    a, b = weights(straight), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    skipped = {entry["key"] for entry in QuarantineLog(rank_log_path(killed, 0)).entries()}
    assert skipped == set(BAD_KEYS)


@pytest.mark.slow
def test_two_rank_dali_run_resumes_exactly_after_sigkill(tmp_path, small_dir):
    """2 ranks (FSDP2, gloo), fixed mode: each rank resumes from its own DALI checkpoint, so the
    killed and resumed run ends bitwise equal to an uninterrupted one."""
    common = {"train.max_steps": 6, "checkpoint.every_steps": 2, "train.deterministic": True,
              "data.backend": "dali", "data.mode": "fixed"}
    runs = {}
    for name in ("straight", "killed"):
        runs[name] = tmp_path / name
        overrides = tiny_overrides(small_dir, runs[name], **common)
        if name == "killed":
            sigkill_after_checkpoint(_pretrain(overrides, ranks=2), runs[name], 2)
        proc = _pretrain(overrides, ranks=2)
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    def weights(run_dir):
        model = build_method(load_config(QUICKSTART, tiny_overrides(small_dir, run_dir, **common)))
        load_model_weights(resolve_checkpoint(run_dir), model)
        return model.state_dict()

    a, b = weights(runs["straight"]), weights(runs["killed"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(runs["killed"])[-2:] == _losses(runs["straight"])[-2:]
