"""The `seer` command line: help texts, one-line errors, ingest --json and inspect."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


def seer(*args, **kw):
    return subprocess.run([sys.executable, "-m", "seer", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120, **kw)


@pytest.mark.parametrize("command", ["ingest", "pretrain", "export", "inspect", "demo-corpus"])
def test_every_subcommand_has_help(command):
    proc = seer(command, "--help")
    assert proc.returncode == 0 and "usage: seer " + command in proc.stdout


def test_ingest_missing_folder_is_one_line_error(tmp_path):
    proc = seer("ingest", tmp_path / "missing", "--out", tmp_path / "shards")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "missing" in proc.stderr


def test_ingest_empty_folder_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = seer("ingest", tmp_path / "empty", "--out", tmp_path / "shards")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_ingest_json_then_inspect(tmp_path, photo_dir):
    (tmp_path / "in").mkdir()
    for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg"):
        (tmp_path / "in" / name).write_bytes((photo_dir / name).read_bytes())
    (tmp_path / "in" / "notes.jpg").write_text("not an image")
    proc = seer("ingest", tmp_path / "in", "--out", tmp_path / "shards", "--json", "--shard-count", 2)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["accepted"] == 3 and sum(report["rejected"].values()) == 1 and len(report["shards"]) == 2
    again = json.loads(seer("ingest", tmp_path / "in", "--out", tmp_path / "shards", "--json").stdout)
    assert again["accepted"] == 0 and again["duplicates"] == 3
    info = json.loads(seer("inspect", tmp_path / "shards", "--json").stdout)
    assert info["kind"] == "shards" and info["shards"] == 2 and info["samples"] == 3 and info["bytes"] > 0


def test_inspect_missing_path(tmp_path):
    proc = seer("inspect", tmp_path / "nope")
    assert proc.returncode == 2 and "no such file" in proc.stderr


@pytest.mark.parametrize("shards", ["missing", "empty"])
def test_pretrain_without_shards_is_one_line_error(tmp_path, shards):
    (tmp_path / "empty").mkdir()
    proc = seer("pretrain", REPO / "configs" / "quickstart.yaml", f"data.shards={tmp_path / shards}",
                f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / shards) in proc.stderr.strip().splitlines()[-1]
