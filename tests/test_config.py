"""Config: presets load, overrides apply, and bad keys/values fail early naming the key."""

import subprocess
import sys
import time

import pytest

from conftest import REPO
from seer.config import ConfigError, load_config, to_yaml, config_from_yaml_text

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_every_preset_loads():
    presets = sorted((REPO / "configs").glob("*.yaml"))
    assert QUICKSTART in presets
    for preset in presets:
        load_config(preset)


def test_overrides_apply_with_types():
    cfg = load_config(QUICKSTART, ["optim.lr=0.1", "train.max_steps=7", "data.mode=fixed", "run.dir=/tmp/x"])
    assert cfg.optim.lr == 0.1 and cfg.train.max_steps == 7 and cfg.data.mode == "fixed"
    assert cfg.run.dir == "/tmp/x"
    assert config_from_yaml_text(to_yaml(cfg)) == cfg


def test_list_elements_are_overridden_by_index():
    cfg = load_config(QUICKSTART, ["augment.crops.1.count=3", "augment.crops.0.scale=[0.5,1.0]"])
    assert cfg.augment.crops[1].count == 3 and list(cfg.augment.crops[0].scale) == [0.5, 1.0]
    assert cfg.augment.crops[0].size == load_config(QUICKSTART).augment.crops[0].size  # the rest kept


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
        ("optim.lr=abc", "'optim.lr': expected float"),
        ("train.batch_size=1.5", "'train.batch_size': expected int"),
        ("data.mode=sometimes", "'data.mode' is 'sometimes'; expected one of online, fixed"),
        ("method.name=simclr", "'method.name'"),
        ("train.max_steps=0", "'train.max_steps' must be > 0"),
        ("train.num_threads=-1", "'train.num_threads' must be >= 0"),
        ("nonsense", "not key=value"),
        ("augment.crops=[{size:32,scale:[0.3,1]}]", "need a space after ':'"),
        ("augment.crops=[{size: 32, count: 2", "cannot parse 'augment.crops="),
        ("augment.crops.5.scale=[0.4,1.0]", "index 5 is out of range: 'augment.crops' has 2 entries"),
        ("augment.crops.0.scal=[0.4,1.0]", "unknown config key 'augment.crops[0].scal'"),
        ("augment.crops.x.size=3", "a list is set whole or by index"),
    ],
)
def test_bad_override_names_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_key_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value) and "train.batch_sise" in str(err.value)
    assert "did you mean 'train.batch_size'" in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "override,needle",
    [("optim.lrr=0.1", "optim.lrr"), ("optim.lr=abc", "expected float")],
)
def test_cli_fails_within_seconds_naming_the_key(override, needle):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "seer", "pretrain", str(QUICKSTART), override],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 30
