"""Shards on object storage, against a real S3 server (moto's, on 127.0.0.1; s3fs/botocore talk
HTTP to it, nothing mocked): the same samples in the same order as from local disk, ingest to a
bucket (and after SIGKILLs), an online stream picking up a new shard, reads ahead hiding a
100 ms round trip, dropped connections (a TCP proxy) skipped and counted, one-line start-up
errors, DALI through the node's shard cache, and a pretraining run killed and resumed from the
bucket ending bitwise equal to the run from local shards."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]')")
pytest.importorskip("moto", reason="moto is not installed (pip install -e '.[dev]')")

from conftest import REPO, sigkill_after_checkpoint, tiny_overrides  # noqa: E402
from s3_server import FAKE_CREDENTIALS, MotoServer, filesystem, upload_folder  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

from data_pipeline.crops import CropSpec, MultiCrop  # noqa: E402
from data_pipeline.ingest import ingest  # noqa: E402
from data_pipeline.manifest import Manifest  # noqa: E402
from data_pipeline.quarantine import QuarantineLog  # noqa: E402
from data_pipeline.sample_corpus import build_sample_corpus  # noqa: E402
from data_pipeline.shards import iter_shard  # noqa: E402
from data_pipeline.storage import RemotePath, StorageError, where  # noqa: E402
from data_pipeline.stream import ShardStream, make_loader  # noqa: E402
from seer.config import ConfigError, load_config  # noqa: E402

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
CROPS = MultiCrop([CropSpec(32, 2, (0.3, 1.0))])


@pytest.fixture(scope="session")
def s3():
    with MotoServer() as server:
        filesystem(server.url).mkdir("corpus")
        yield server


@pytest.fixture(scope="session")
def bucket_shards(s3, shard_dir) -> str:
    """The conftest corpus (38 photos, 5 shards, its manifest) copied to the bucket as it is."""
    upload_folder(filesystem(s3.url), shard_dir, "corpus/shards")
    return "s3://corpus/shards"


@pytest.fixture
def s3_env(s3, monkeypatch) -> dict:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **s3.env(), "OMP_NUM_THREADS": "1"}


def keys_and_views(stream, n):
    items = [item for _, item in zip(range(n), stream)]
    return [i["key"] for i in items], [v for i in items for v in i["views"]]


def test_storage_options_name_the_endpoint_and_credentials(s3, bucket_shards, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # wrong: the options below win
    options = {"endpoint_url": s3.url, "key": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
               "secret": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    assert len(Manifest.load(where(bucket_shards, options)).shards) == 5


def test_locations_name_what_seer_serves(s3_env):
    remote = where("s3://corpus/shards/")
    assert isinstance(remote, RemotePath) and str(remote / "shard-000001.tar") == "s3://corpus/shards/shard-000001.tar"
    assert (remote / "a.tar").stem == "a" and (remote / "a.tar").with_name("a.idx").name == "a.idx"
    assert where("file:///tmp/x") == Path("/tmp/x") and where("shards") == Path("shards")
    with pytest.raises(ValueError, match="not gs://"):
        where("gs://bucket/shards")
    with pytest.raises(StorageError, match="no such bucket 'nobucket'"):
        Manifest.load("s3://nobucket/shards")


def test_bucket_serves_the_same_samples_in_the_same_order_as_local_disk(s3_env, bucket_shards, shard_dir):
    for mode, window in (("fixed", 0), ("fixed", 2), ("online", 0)):
        local = keys_and_views(ShardStream(shard_dir, CROPS, mode=mode, seed=3, window=window), 40)
        remote = keys_and_views(ShardStream(bucket_shards, CROPS, mode=mode, seed=3, window=window), 40)
        assert remote[0] == local[0], mode
        assert all(torch.equal(a, b) for a, b in zip(remote[1], local[1]))


def test_ingest_to_a_bucket_publishes_shards_index_and_manifest(s3_env, photo_dir, tmp_path, monkeypatch):
    from seer.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["ingest", str(photo_dir), "--out", "s3://corpus/ingested", "--shard-count", "10", "--json"]) == 0
    assert not (tmp_path / "s3:").exists()  # the bug this replaces: a local folder named s3:
    manifest = Manifest.load("s3://corpus/ingested")
    assert [s.count for s in manifest.shards] == [10, 10, 10, 8]
    for info in manifest.shards:
        shard = manifest.shard_path(info)
        assert shard.stat().st_size == info.bytes and len(list(iter_shard(shard))) == info.count
        assert shard.with_name(f"{info.name}.idx").exists()
    again = ingest([photo_dir], "s3://corpus/ingested", shard_max_count=10)
    assert again.accepted == 0 and again.duplicates == 38

    # killed between the uploads and the manifest save: the next run adopts the shard
    last = manifest.shards.pop()
    manifest.next_index -= 1
    manifest.save()
    report = ingest([photo_dir], "s3://corpus/ingested", shard_max_count=10)
    assert report.recovered_shards == [last.name] and report.accepted == 0


CHILD = """
import sys
from data_pipeline.ingest import ingest
print("ready", flush=True)
ingest([sys.argv[1]], sys.argv[2], shard_max_count=3)
"""


@pytest.mark.slow
def test_ingest_to_a_bucket_killed_at_random_moments_lists_only_complete_shards(s3_env, tmp_path):
    photos = build_sample_corpus(tmp_path / "photos", crops_per_photo=0, seed=1)[:12]
    source, out, rng = tmp_path / "in", "s3://corpus/killed", random.Random(2)
    source.mkdir()
    command = [sys.executable, "-c", CHILD, str(source), out]
    env = {**s3_env, "PYTHONPATH": str(REPO)}
    for round_files in (photos[0::3], photos[1::3], photos[2::3]):
        for path in round_files:
            (source / path.name).write_bytes(path.read_bytes())
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, cwd=tmp_path)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.3, 1.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        for info in Manifest.load(out).shards:  # whatever is listed is complete
            assert len(list(iter_shard(where(out) / f"{info.name}.tar"))) == info.count
    finished = subprocess.run(command, env=env, capture_output=True, cwd=tmp_path, timeout=120)
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    manifest = Manifest.load(out)
    stored = [s.meta["sha256"] for info in manifest.shards for s in iter_shard(manifest.shard_path(info))]
    assert len(stored) == len(set(stored)) == 12
    assert {p.name for p in where(out).glob("*.tar")} == {f"{s.name}.tar" for s in manifest.shards}


def test_reads_ahead_hide_a_100_ms_round_trip(s3, bucket_shards, monkeypatch):
    with TcpProxy(s3.port, latency=0.1) as proxy:
        for key, value in s3.env(proxy.url).items():
            monkeypatch.setenv(key, value)
        stream = iter(ShardStream(bucket_shards, CROPS, mode="fixed", seed=1, read_ahead=16))
        first = [next(stream)["key"] for _ in range(10)]  # every shard's table is loaded by now
        start = time.perf_counter()
        keys = first + [next(stream)["key"] for _ in range(60)]
        elapsed = time.perf_counter() - start
    assert len(set(keys[:38])) == 38 and keys[38:] != keys[:32]  # a second epoch, in another order
    assert elapsed < 0.5 * 60 * 0.1, f"{elapsed:.2f} s for 60 samples: reads are not overlapped"


def test_store_unreachable_mid_run_costs_skipped_samples_not_a_hang(s3, bucket_shards, monkeypatch, tmp_path):
    quarantine = tmp_path / "q.jsonl"
    with TcpProxy(s3.port) as proxy:
        for key, value in s3.env(proxy.url).items():
            monkeypatch.setenv(key, value)
        stream = iter(ShardStream(bucket_shards, CROPS, mode="fixed", seed=1, read_ahead=4, quarantine_path=quarantine))
        for _ in range(12):
            next(stream)
        proxy.drop = 1.0  # every request dropped for 3 s: reads fail after their retries
        threading.Timer(3.0, lambda: setattr(proxy, "drop", 0.0)).start()
        start = time.perf_counter()
        item = next(stream)
        while item["skipped"] == 0 and time.perf_counter() - start < 30:  # what was read ahead comes first
            item = next(stream)
        elapsed = time.perf_counter() - start
    assert item["skipped"] >= 1 and elapsed < 30
    assert QuarantineLog(quarantine).counts().get("sample_unreadable", 0) == item["skipped"]


@pytest.mark.slow
def test_online_stream_picks_up_a_shard_ingested_into_the_bucket(s3_env, s3, shard_dir, tmp_path):
    upload_folder(filesystem(s3.url), shard_dir, "corpus/online")
    stream = ShardStream("s3://corpus/online", CROPS, mode="online", seed=0, poll_seconds=1.0)
    batches = iter(make_loader(stream, batch_size=4, num_workers=1))
    next(batches)
    new = [p for p in build_sample_corpus(tmp_path / "new", crops_per_photo=1, seed=7) if "crop" in p.name][:4]
    report = ingest(new, "s3://corpus/online", shard_max_count=10)
    assert report.accepted == 4
    name = report.shards[0]
    deadline = time.monotonic() + 90
    while not any(key.startswith(name) for key in next(batches)["keys"]):
        assert time.monotonic() < deadline, f"no sample of {name} served within 90 s"


def pretrain(overrides, env, check=True):
    proc = subprocess.run([sys.executable, "-m", "seer", "pretrain", QUICKSTART, *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_pretrain_from_a_bucket_killed_and_resumed_equals_the_run_from_local_shards(s3_env, bucket_shards,
                                                                                   shard_dir, tmp_path):
    from test_resume import weights

    common = {"train.max_steps": 8, "checkpoint.every_steps": 2, "train.deterministic": True}
    local, killed = tmp_path / "local", tmp_path / "killed"
    overrides = tiny_overrides(bucket_shards, killed, **common)
    straight = subprocess.Popen([sys.executable, "-m", "seer", "pretrain", QUICKSTART,  # at the same time
                                 *tiny_overrides(shard_dir, local, **common)], cwd=REPO, env=s3_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen([sys.executable, "-m", "seer", "pretrain", QUICKSTART, *overrides], cwd=REPO, env=s3_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sigkill_after_checkpoint(proc, killed, 4)
    assert straight.wait(600) == 0, straight.stderr.read()[-3000:]
    assert (killed / "checkpoints" / "latest").read_text().strip() < "step_00000008"
    assert "resumed from" in pretrain(overrides, s3_env).stderr
    a, b = weights(local, overrides), weights(killed, overrides)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_pretrain_finishes_with_5_percent_of_connections_dropped(s3, bucket_shards, tmp_path):
    with TcpProxy(s3.port, drop=0.05, seed=3) as proxy:
        env = {**os.environ, **s3.env(proxy.url), "OMP_NUM_THREADS": "1"}
        run = tmp_path / "run"
        pretrain(tiny_overrides(bucket_shards, run, **{"data.num_workers": 2}), env)
    assert proxy.dropped > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["data_skipped"] for r in rows if "loss" in r]  # the skipped count is logged every step


@pytest.mark.slow
def test_bad_bucket_credentials_and_endpoint_are_one_line_errors(s3, bucket_shards, photo_dir, tmp_path):
    env = {**os.environ, **s3.env(), "OMP_NUM_THREADS": "1"}
    with MotoServer(auth=True) as strict:  # a server that checks credentials: ours are unknown to it
        cases = {  # what a new user runs -> what the one line must say
            ("pretrain", QUICKSTART, *tiny_overrides("s3://nobucket/shards", tmp_path / "run")):
                ("no such bucket 'nobucket'", env),
            ("ingest", str(photo_dir), "--out", bucket_shards):
                ("access denied", {**env, "AWS_ENDPOINT_URL": strict.url}),
            ("inspect", bucket_shards): ("cannot connect to endpoint http://127.0.0.1:9", {**env, "AWS_ENDPOINT_URL":
                                                                                         "http://127.0.0.1:9"}),
        }
        procs = {args: subprocess.Popen([sys.executable, "-m", "seer", *args], cwd=tmp_path, env=case_env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for args, (_, case_env) in cases.items()}
        for args, proc in procs.items():
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 2, err[-2000:]
            assert err.strip().splitlines()[-1].startswith(f"seer {args[0]}: error: ") and cases[args][0] in err, err
            assert "Traceback" not in err
    assert not (tmp_path / "s3:").exists()
    with pytest.raises(ConfigError, match="run.dir=s3://corpus/run: checkpoints and logs"):
        load_config(QUICKSTART, tiny_overrides(bucket_shards, "s3://corpus/run"))


@pytest.mark.slow
def test_dali_reads_a_bucket_through_the_bounded_shard_cache(s3_env, bucket_shards, shard_dir, tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install 'seer[dali]')")
    from test_dali import loader_for, tiny_config

    cfg = tiny_config(shard_dir, tmp_path / "run")
    local = loader_for(cfg, shard_dir, tmp_path / "local")
    remote = loader_for(cfg, bucket_shards, tmp_path / "remote", shard_cache=(tmp_path / "cache", 1.0))
    for _ in range(3):
        a, b = next(local), next(remote)
        assert a["keys"] == b["keys"] and all(torch.equal(x, y) for x, y in zip(a["views"], b["views"]))
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*/*.tar"))
    assert cached == sorted(p.name for p in shard_dir.glob("*.tar"))
    with pytest.raises(ValueError, match="the DALI backend reads local files.*data.cache_gb"):
        loader_for(cfg, bucket_shards, tmp_path / "small", shard_cache=(tmp_path / "small-cache", 0.0001))
