"""Loading the run configuration: YAML presets and ``key=value`` overrides onto the typed schema
(:mod:`seer.config_schema`, whose names this module re-exports).

``load_config(path, overrides)`` merges a preset onto the schema, then the command-line
overrides onto that, and returns plain dataclasses. Any unknown key, wrong type or value outside
its allowed set raises :class:`ConfigError` naming the key and where it came from (the YAML file
or the command line) before any work starts.
"""

from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from seer.config_schema import (  # noqa: F401  (re-exported: the schema's home is config_schema)
    RunConfig,
    DataConfig,
    CropGroup,
    AugmentConfig,
    ModelConfig,
    SwAVConfig,
    MoCoV3Config,
    MethodConfig,
    TrainConfig,
    OptimConfig,
    ScheduleConfig,
    CheckpointConfig,
    ParallelConfig,
    GuardConfig,
    EvalConfig,
    MonitorConfig,
    SeerConfig,
    CHOICES,
    POSITIVE,
)


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and its source."""


def _all_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        name = f"{prefix}{f.name}"
        keys.append(name)
        default = getattr(schema, f.name)
        if is_dataclass(default):
            keys.extend(_all_keys(default, name + "."))
    return keys


def _field_type(key: str) -> str:
    """The schema's type of a dotted key, as a readable name (``float``, ``list[int]``...)."""
    obj: Any = SeerConfig()
    hints: Any = None
    for part in key.split("[")[0].split("."):
        if not is_dataclass(obj):
            return "?"
        match = [f for f in fields(obj) if f.name == part]
        if not match:
            return "?"
        hints = match[0].type
        obj = getattr(obj, part)
    text = str(hints)
    text = {"Optional[float]": "float or null"}.get(text, text).replace("List", "list")
    return f"elements of {text}" if "[" in key else text


def _describe(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        close = difflib.get_close_matches(key, _all_keys(SeerConfig()), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{source}: unknown config key '{key}'{hint}"
    if isinstance(err, ValidationError):
        return f"{source}: bad value for config key '{key}': expected {_field_type(key)} ({str(err).splitlines()[0]})"
    return f"{source}: config key '{key}': {str(err).splitlines()[0]}"


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, source)) from None
    except TypeError:  # a mapping merged into a list
        raise ConfigError(f"{source}: a list is set whole or by index (e.g. augment.crops.0.size=96)") from None


def _set_in_list(cfg: DictConfig, key: str, value: Any, source: str) -> DictConfig:
    """``key=value`` where the key indexes into a list (``augment.crops.0.scale=[0.4,1]``): a
    dotlist merge cannot reach into lists, so the element is updated in place."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if OmegaConf.is_list(node):
            if not part.isdigit() or int(part) >= len(node):
                where = ".".join(parts[:depth])
                raise ConfigError(f"{source}: index {part} is out of range: '{where}' has {len(node)} entries")
            node = node[int(part)]
        elif OmegaConf.is_dict(node) and part in node:
            node = node[part]
        else:
            break  # an unknown key: OmegaConf.update names it
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, source)) from None
    return cfg


def _check_values(cfg: SeerConfig) -> None:
    def get(key: str) -> Any:
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    for key, allowed in CHOICES.items():
        if get(key) not in allowed:
            raise ConfigError(f"config key '{key}' is {get(key)!r}; expected one of {', '.join(allowed)}")
    for key in POSITIVE:
        if get(key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get(key)!r}")
    if cfg.eval.every_steps < 0 or (cfg.eval.every_steps > 0 and not cfg.eval.data):
        raise ConfigError("config key 'eval.every_steps' must be >= 0, and > 0 needs 'eval.data' (labelled images)")
    m = cfg.monitor
    if m.every_steps < 0 or m.patience < 1 or not 0 <= m.min_rank_fraction <= 1 or min(m.min_std_ratio, m.min_rank) < 0:
        raise ConfigError("config keys 'monitor.*': every_steps >= 0, patience >= 1, min_rank_fraction in [0, 1], "
                          "min_rank and min_std_ratio >= 0")
    if not 0 < cfg.train.failure_timeout_s <= cfg.train.slow_timeout_s:
        raise ConfigError(f"config keys 'train.failure_timeout_s' ({cfg.train.failure_timeout_s}) and "
                          f"'train.slow_timeout_s' ({cfg.train.slow_timeout_s}) must be > 0, the first <= the second")
    if cfg.train.num_threads < 0:
        raise ConfigError(f"config key 'train.num_threads' must be >= 0 (0: torch's default), got {cfg.train.num_threads}")
    if cfg.data.read_ahead < 0 or cfg.data.cache_gb <= 0:
        raise ConfigError("config keys 'data.read_ahead' must be >= 0 and 'data.cache_gb' > 0")
    if "://" in cfg.run.dir:
        raise ConfigError(f"run.dir={cfg.run.dir}: checkpoints and logs are written to a local or shared file "
                          "system (checkpoint folders are renamed into place; object stores cannot rename); "
                          "data.shards may be s3://")
    if cfg.data.shuffle_window < 0:
        raise ConfigError(f"config key 'data.shuffle_window' must be >= 0 (0: whole corpus), got {cfg.data.shuffle_window}")
    for group in cfg.augment.crops:
        if len(group.scale) != 2 or not 0 < group.scale[0] <= group.scale[1] <= 1:
            raise ConfigError(f"augment.crops: scale {group.scale} must be [min, max] with 0 < min <= max <= 1")
    n_crops = sum(g.count for g in cfg.augment.crops)
    bad = [i for i in cfg.method.swav.crops_for_assign if not 0 <= i < n_crops]
    if cfg.method.name == "swav" and bad:
        raise ConfigError(f"method.swav.crops_for_assign {bad} out of range for {n_crops} crops")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> SeerConfig:
    """Schema defaults <- YAML preset at ``path`` <- ``key=value`` overrides, validated."""
    cfg = OmegaConf.structured(SeerConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            preset = OmegaConf.load(path)
        except Exception as err:  # yaml syntax errors
            raise ConfigError(f"{path}: cannot parse YAML: {str(err).splitlines()[0]}") from None
        cfg = _merge(cfg, preset, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not key=value")
        key = item.split("=", 1)[0]
        try:
            dot = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as err:  # a value that is not valid YAML
            reason = " ".join(str(err).split())
            hint = " (YAML mappings need a space after ':')" if "':'" in reason else ""
            raise ConfigError(f"command line: cannot parse '{item}': {reason}{hint}") from None
        if any(part.isdigit() for part in key.split(".")):
            cfg = _set_in_list(cfg, key, OmegaConf.select(dot, key), f"command line '{key}'")
        else:
            cfg = _merge(cfg, dot, f"command line '{key}'")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, str(path or "config"))) from None
    _check_values(obj)
    return obj


def to_yaml(cfg: SeerConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml_text(text: str) -> SeerConfig:
    """Parse a resolved config as saved in a run folder (``config.yaml``)."""
    return OmegaConf.to_object(_merge(OmegaConf.structured(SeerConfig), OmegaConf.create(text), "config.yaml"))
