"""What a GPU run needs that can be checked on CPU: the CUDA device a rank picks, cuBLAS's
determinism setting before CUDA starts, pinned batches, per-rank quarantine logs read back
merged, and the fp16 loss scale and summed skip count in the metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_overrides
from data_pipeline.quarantine import QuarantineLog, log_paths, merged_counts, merged_entries, rank_log_path
from seer.engine.distributed import CUBLAS_WORKSPACE, cuda_index, prepare_determinism


def test_cuda_index_uses_local_rank_only_with_several_visible_gpus():
    assert cuda_index(local_rank=3, visible=8) == 3
    assert cuda_index(local_rank=3, visible=1) == 0  # the scheduler bound one GPU to this task
    assert cuda_index(local_rank=0, visible=1) == 0
    with pytest.raises(RuntimeError, match="sees only 2 GPUs"):
        cuda_index(local_rank=5, visible=2)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_index(local_rank=0, visible=0)


def test_deterministic_sets_cublas_workspace_before_cuda(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    prepare_determinism("cpu")
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    prepare_determinism("cuda")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's choice is kept
    prepare_determinism("auto")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    # pretrain sets it through init_distributed, which runs before anything touches CUDA
    code = ("import os; from seer.engine.distributed import init_distributed; "
            "init_distributed('cpu', deterministic=True); print(os.environ.get('CUBLAS_WORKSPACE_CONFIG')); "
            "init_distributed('auto', deterministic=True); print(os.environ.get('CUBLAS_WORKSPACE_CONFIG'))")
    env = {k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", "WORLD_SIZE", "RANK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.stdout.split() == ["None", CUBLAS_WORKSPACE], out.stderr  # train.device=cpu: nothing to set


def test_batches_are_pinned_only_for_cuda(shard_dir, tmp_path):
    from data_pipeline.batch_source import batch_loader
    from data_pipeline.crops import MultiCrop
    from data_pipeline.stream import ShardStream
    from seer.config import load_config
    from seer.engine.data import crop_specs

    cfg = load_config(REPO / "configs" / "quickstart.yaml", tiny_overrides(shard_dir, tmp_path))
    stream = ShardStream(shard_dir, MultiCrop(crop_specs(cfg)), seed=0)
    assert batch_loader(stream, 4, 0, torch.device("cuda", 0)).pin_memory is True
    assert batch_loader(stream, 4, 0, torch.device("cpu")).pin_memory is False


def test_quarantine_logs_per_rank_read_back_merged(tmp_path):
    QuarantineLog(tmp_path / "quarantine.jsonl").record("not_an_image", source="/in/a.txt")
    for rank, reason in ((1, "decode_error"), (0, "decode_error"), (1, "too_large"), (12, "decode_error")):
        QuarantineLog(rank_log_path(tmp_path, rank)).record(reason, shard="s.tar", key=f"k{rank}")
    with open(rank_log_path(tmp_path, 0), "ab") as handle:
        handle.write(b'{"time": 1, "reas')  # a writer killed mid-line
    (tmp_path / "quarantine-rankX.jsonl").write_text("{}\n")  # not a rank log
    assert [p.name for p in log_paths(tmp_path)] == [
        "quarantine.jsonl", "quarantine-rank0.jsonl", "quarantine-rank1.jsonl", "quarantine-rank12.jsonl"]
    entries = merged_entries(tmp_path)
    assert len(entries) == 5
    assert [e["time"] for e in entries] == sorted(e["time"] for e in entries)
    assert sorted(e.get("rank", -1) for e in entries) == [-1, 0, 1, 1, 12]
    assert merged_counts(tmp_path) == {"not_an_image": 1, "decode_error": 3, "too_large": 1}
    with pytest.raises(ValueError):
        rank_log_path(tmp_path, -1)


@pytest.mark.slow
def test_fp16_run_logs_loss_scale_and_data_skipped(tmp_path, shard_dir):
    run = tmp_path / "run"
    overrides = tiny_overrides(shard_dir, run, **{"train.precision": "fp16", "train.max_steps": 2})
    proc = subprocess.run([sys.executable, "-m", "seer", "pretrain", str(REPO / "configs" / "quickstart.yaml"),
                           *overrides, "--json"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2
    for record in steps:
        assert record["data_skipped"] == 0
        assert 1.0 <= record["loss_scale"] <= 2.0**16  # starts at 2^16, halves on overflow
