"""Evaluation on real labelled images (scikit-learn's handwritten digits): the probes against
scikit-learn and numpy, the three data layouts, and `seer eval` / `seer plot` on a real run."""

import gzip
import io
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tiny_overrides
from seer.eval.datasets import load_labelled, read_idx
from seer.eval.probes import effective_rank, knn_accuracy, linear_probe, lowshot


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(labels))
    return images[order].astype(np.float32), labels[order]


def _digit_images(images: np.ndarray) -> np.ndarray:
    """8x8 digits (0..16) as 32x32 uint8 grayscale images."""
    pixels = (images.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(p).resize((32, 32), Image.BILINEAR)) for p in pixels])


def test_linear_probe_within_one_point_of_sklearn(digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = digits
    train, test = slice(0, 1200), slice(1200, None)
    ours = linear_probe(x[train], y[train], x[test], y[test])["accuracy"]
    scaler = StandardScaler().fit(x[train])
    reference = LogisticRegression(max_iter=5000).fit(scaler.transform(x[train]), y[train])
    theirs = 100.0 * reference.score(scaler.transform(x[test]), y[test])
    assert theirs > 95.0
    assert abs(ours - theirs) <= 1.0, (ours, theirs)


def test_knn_equals_direct_numpy_computation(digits):
    x, y = digits
    train_x, train_y, test_x, test_y = x[:1200], y[:1200], x[1200:], y[1200:]
    ours = knn_accuracy(train_x, train_y, test_x, test_y, ks=(10, 20, 100))
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    similarity = b.astype(np.float64) @ a.T.astype(np.float64)
    for k in (10, 20, 100):
        correct = 0
        for row, truth in zip(similarity, test_y):
            nearest = np.argsort(-row, kind="stable")[:k]
            votes = np.zeros(10)
            np.add.at(votes, train_y[nearest], np.exp(row[nearest] / 0.07))
            correct += int(np.argmax(votes) == truth)
        assert round(ours[f"k{k}"] * len(test_y) / 100.0) == correct  # the same test samples right
    assert ours["k10"] > 95.0


def test_lowshot_and_effective_rank(digits):
    x, y = digits
    result = lowshot(x[:1200], y[:1200], x[1200:], y[1200:], shots=(1, 10), repeats=2)
    assert result["1-shot"]["repeats"] == 2
    assert 30.0 < result["1-shot"]["knn"] < result["10-shot"]["knn"]
    assert 30.0 < result["1-shot"]["linear"] < result["10-shot"]["linear"]
    rng = np.random.default_rng(0)
    low = rng.normal(size=(500, 3)) @ rng.normal(size=(3, 64))  # rank 3 in 64 dimensions
    assert effective_rank(low) < 3.01
    assert effective_rank(rng.normal(size=(2000, 64))) > 55


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def labelled_layouts(tmp_path_factory, digits):
    """The same 300 training and 100 test digits as IDX files, an image-folder tree and .cls shards."""
    import webdataset as wds

    x, y = digits
    images = _digit_images(x[:400])
    root = tmp_path_factory.mktemp("labelled")
    idx = root / "idx"
    idx.mkdir()
    _write_idx(idx / "train-images-idx3-ubyte.gz", images[:300])
    _write_idx(idx / "train-labels-idx1-ubyte.gz", y[:300])
    _write_idx(idx / "t10k-images-idx3-ubyte.gz", images[300:])
    _write_idx(idx / "t10k-labels-idx1-ubyte.gz", y[300:400])
    for split, part in (("train", slice(0, 300)), ("val", slice(300, 400))):
        for i, (image, label) in enumerate(zip(images[part], y[part])):
            folder = root / "folders" / split / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:04d}.png")
        (root / "shards" / split).mkdir(parents=True)
        with wds.TarWriter(str(root / "shards" / split / "000000.tar")) as sink:
            for i, (image, label) in enumerate(zip(images[part], y[part])):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                sink.write({"__key__": f"s{i:05d}", "png": buffer.getvalue(), "cls": int(label)})
            buffer = io.BytesIO()
            Image.fromarray(images[0]).save(buffer, format="PNG")
            sink.write({"__key__": "unlabelled", "png": buffer.getvalue()})  # no .cls: skipped, counted
    return root, images, y[:400]


def test_three_layouts_give_the_same_images_and_labels(labelled_layouts):
    root, images, labels = labelled_layouts
    assert read_idx(root / "idx" / "train-images-idx3-ubyte.gz").shape == (300, 32, 32)
    for layout in ("idx", "folders", "shards"):
        for split, part in (("train", slice(0, 300)), ("test", slice(300, 400))):
            data = load_labelled(root / layout, split)
            assert len(data) == part.stop - part.start
            order = np.argsort(data.labels, kind="stable") if layout == "folders" else np.arange(len(data))
            assert sorted(data.labels.tolist()) == sorted(labels[part].tolist())
            assert np.asarray(data.image(int(order[0]))).shape == (32, 32, 3)
            if layout == "shards":
                assert data.skipped == 1
                assert np.array_equal(np.asarray(data.image(0))[..., 0], images[part][0])
    with pytest.raises(ValueError, match="no sample with an image and a .cls"):
        load_labelled(_empty_shards(root))


def _empty_shards(root):
    import webdataset as wds

    folder = root / "unlabelled_shards"
    if not folder.exists():
        folder.mkdir()
        with wds.TarWriter(str(folder / "000000.tar")) as sink:
            sink.write({"__key__": "a", "txt": "no image"})
    return folder


@pytest.mark.slow
def test_eval_cli_and_training_probe_on_a_real_run(tmp_path, shard_dir, labelled_layouts):
    root, _, _ = labelled_layouts
    run = tmp_path / "run"
    overrides = tiny_overrides(shard_dir, run, **{
        "eval.every_steps": 3, "eval.data": root / "folders", "eval.train_images": 200, "eval.test_images": 60,
        "train.num_threads": 1,
    })
    proc = subprocess.run([sys.executable, "-m", "seer", "pretrain", str(REPO / "configs" / "quickstart.yaml"),
                           *overrides, "--json"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if "eval/knn_k20" in r]
    assert [r["step"] for r in probes] == [0, 3, 6]  # step 0: the untrained backbone
    assert all(10.0 <= r["eval/knn_k20"] <= 100.0 and r["eval/effective_rank"] > 1.0 for r in probes)
    png = run / "run.png"
    assert summary["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["torch_threads"] == 1  # train.num_threads

    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "seer", "eval", "knn", str(run), "--data", str(root / "shards"),
               "--cache-dir", str(cache), "--json"]
    first = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads(first.stdout)
    assert report["step"] == 6 and report["data"]["train_images"] == 300 and report["data"]["test_images"] == 100
    assert set(report["results"]) == {"k10", "k20", "k100"}
    assert len(list(cache.glob("*.npy"))) == 2  # train and test features, cached
    again = json.loads(subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300).stdout)
    assert again["results"] == report["results"]
    assert json.loads((run / "eval" / "knn_step6.json").read_text())["results"] == report["results"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert "eval/knn/k20" in events.Tags()["scalars"] and "eval/knn_k20" in events.Tags()["scalars"]

    export = tmp_path / "backbone.safetensors"
    subprocess.run([sys.executable, "-m", "seer", "export", str(run), "--out", str(export), "--format", "timm",
                    "--num-classes", "0"], check=True, capture_output=True, cwd=REPO, timeout=300)
    table = subprocess.run([sys.executable, "-m", "seer", "eval", "linear", str(export), "--data",
                            str(root / "idx"), "--no-cache"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "| linear/accuracy |" in table.stdout and (tmp_path / "backbone.eval-linear.json").is_file()
    plot = subprocess.run([sys.executable, "-m", "seer", "plot", str(run), "--out", str(tmp_path / "p.png")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert plot.returncode == 0 and (tmp_path / "p.png").stat().st_size > 10_000
