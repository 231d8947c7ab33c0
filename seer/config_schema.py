"""The run configuration's schema: one dataclass per section with its defaults, and the allowed
values (``CHOICES``, ``POSITIVE``) that :mod:`seer.config` checks after merging a preset and overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class RunConfig:
    dir: str = "runs/default"  # everything a run writes goes under it


@dataclass
class DataConfig:
    shards: str = ""  # folder of WebDataset shards (with manifest.json, or plain *.tar); or s3://bucket/prefix
    mode: str = "online"  # online: endless resampled stream; fixed: exact epochs
    num_workers: int = 2  # DataLoader worker processes per rank
    retention_days: Optional[float] = None  # shards older than this are no longer served
    poll_seconds: float = 60.0  # how often the stream looks for newly published shards
    max_pixels: int = 100_000_000  # decompression-bomb limit at decode time
    shuffle_window: int = 0  # 0: batches drawn from the whole corpus; k: k shards open per worker (seek-costly storage)
    backend: str = "torch"  # torch: DataLoader workers + color on the device; dali: NVIDIA DALI (extra `dali`)
    storage_options: Dict[str, Any] = field(default_factory=dict)  # s3://: s3fs options (endpoint_url, key, ...)
    read_ahead: int = 32  # s3://: ranged GETs in flight per data worker (memory: read_ahead x image size)
    cache_dir: str = ""  # dali + s3://: node-local shard cache (default: run.dir/shard_cache)
    cache_gb: float = 50.0  # dali + s3://: bound of that cache (least recently used shards evicted)


@dataclass
class CropGroup:
    size: int = 224
    count: int = 2
    scale: List[float] = field(default_factory=lambda: [0.14, 1.0])
    blur_p: float = 0.5
    solarize_p: float = 0.0


@dataclass
class AugmentConfig:
    crops: List[CropGroup] = field(
        default_factory=lambda: [
            CropGroup(size=224, count=2, scale=[0.14, 1.0]),
            CropGroup(size=96, count=6, scale=[0.05, 0.14]),
        ]
    )
    ratio: List[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    flip_p: float = 0.5
    color_jitter: List[float] = field(default_factory=lambda: [0.8, 0.8, 0.8, 0.2])
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    device: str = "auto"  # where the color stage runs: auto (the training device), cpu, cuda


@dataclass
class ModelConfig:
    backbone: str = "regnety_400mf"  # a name from seer.models.list_models()
    kwargs: Dict[str, Any] = field(default_factory=dict)  # constructor overrides, e.g. {num_heads: 12}


@dataclass
class SwAVConfig:
    head_hidden: List[int] = field(default_factory=lambda: [2048])
    head_out: int = 128
    head_bn: bool = True
    n_prototypes: int = 3000
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    crops_for_assign: List[int] = field(default_factory=lambda: [0, 1])
    freeze_prototypes_steps: int = 313
    queue_length: int = 0  # embeddings kept per rank; 0 disables the queue
    queue_start_step: int = 0
    collapse_patience: int = 500  # warn when the loss has sat at ln(K) this many steps in a row


@dataclass
class MoCoV3Config:
    projector_hidden: int = 4096
    predictor_hidden: int = 4096
    out_dim: int = 256
    temperature: float = 0.2
    momentum: float = 0.99  # rises to 1 on a cosine schedule


@dataclass
class MethodConfig:
    name: str = "swav"
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    mocov3: MoCoV3Config = field(default_factory=MoCoV3Config)


@dataclass
class TrainConfig:
    batch_size: int = 32  # per rank
    max_steps: int = 1000
    log_every: int = 10
    device: str = "auto"  # auto, cpu, cuda
    precision: str = "fp32"  # fp32, bf16, fp16 (fp16 uses dynamic loss scaling)
    grad_clip: Optional[float] = None  # max global gradient norm; None disables clipping
    deterministic: bool = False  # torch.use_deterministic_algorithms for exact-resume checks
    inject_nan_steps: List[int] = field(default_factory=list)  # fault injection: NaN loss once at these steps
    num_threads: int = 0  # torch intra-op threads of each training process; 0: torch's default (all cores)
    # a rank that dies, stops or hangs is noticed by the others within this many seconds (heartbeats,
    # collective timeouts, no step completed); every rank then ends with one line (seer.engine.watchdog)
    failure_timeout_s: float = 120.0
    # the same allowance around what may legitimately take long: start-up to the first step (process
    # group, checkpoint load, DataLoader workers), checkpoint saves, the kNN probe
    slow_timeout_s: float = 1800.0
    inject_crash_step: int = 0  # fault injection: rank inject_crash_rank raises after this step, every time (0: off)
    inject_crash_rank: int = 0
    compile: str = "off"  # torch.compile: off, blocks (each backbone block and head on its own), full (the whole method)
    memory_format: str = "auto"  # auto (the backbone's choice per device type), channels_last, contiguous


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd, lars, adamw
    lr: float = 0.3  # per 256 images; the LR used is lr * global_batch / 256
    weight_decay: float = 1e-6
    momentum: float = 0.9
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    trust_coefficient: float = 0.001  # LARS


@dataclass
class ScheduleConfig:
    mode: str = "cosine"  # cosine (fixed dataset) or plateau (online stream)
    warmup_steps: int = 0
    start_lr: float = 0.0  # per 256 images, at step 0 of the warmup
    final_lr: float = 0.0  # per 256 images, at max_steps (cosine)
    plateau_patience: int = 1000  # steps without relative improvement before halving
    plateau_threshold: float = 0.01  # relative improvement that counts
    plateau_smoothing: float = 0.99  # EMA factor of the smoothed loss
    plateau_factor: float = 0.5
    min_lr: float = 0.0  # per 256 images, floor of plateau halving


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    keep_last: int = 3
    asynchronous: bool = False  # stage to CPU memory, write in the background while training goes on


@dataclass
class ParallelConfig:
    strategy: str = "fsdp"  # fsdp (FSDP2 fully_shard per block + root) or ddp; one rank: neither
    sharding: str = "full"  # full: shard over all ranks; hybrid: shard inside a group, replicate across
    shard_group_size: int = 0  # hybrid: ranks per shard group (0: ranks per node, LOCAL_WORLD_SIZE)
    reshard_after_forward: bool = True
    reduce_fp32: bool = True  # gradient reduction in fp32 under bf16/fp16 parameters
    activation_checkpointing: bool = False  # non-reentrant, per block
    checkpoint_stages: Optional[List[int]] = None  # stage indices to checkpoint (None: every stage)
    syncbn_group_size: int = 0  # 0: plain BatchNorm; -1: SyncBN over all ranks; N: groups of N ranks


@dataclass
class GuardConfig:
    skip_nonfinite: bool = True  # a non-finite loss or gradient skips the update
    max_bad_steps: int = 3  # K non-finite steps in a row roll back to the last good checkpoint
    rollback_lr_factor: float = 0.5  # LR multiplier applied after each rollback
    spike_factor: float = 10.0  # a gradient norm above factor x its running mean is a spike
    grad_norm_every: int = 10  # log per-layer gradient norms every N steps


@dataclass
class EvalConfig:
    every_steps: int = 0  # kNN probe every N steps during pretraining (and at the end); 0: never
    data: str = ""  # labelled images: image-folder tree, shards with .cls, or IDX files (seer eval --data)
    test: str = ""  # labelled test images; empty: the test split of eval.data
    train_images: int = 2000  # reference images for kNN (seeded subset)
    test_images: int = 1000  # images scored (seeded subset)
    size: int = 0  # input size in px; 0: the largest crop size
    k: int = 20  # neighbours
    batch_size: int = 128


@dataclass
class MonitorConfig:
    every_steps: int = 20  # health numbers of the step's batch every N steps (0: off); see seer.engine.monitor
    min_rank: float = 12.0  # a check is bad when the backbone features' batch RankMe is below this (or below
    min_rank_fraction: float = 0.25  # this fraction of min(N, D) when lower: small batches) or when their...
    min_std_ratio: float = 0.1  # ...L2-normalised std x sqrt(D) is below this (1: no collapse; 0 at one point)
    patience: int = 3  # bad checks in a row that raise the collapse alarm
    stop_on_collapse: bool = False  # on the alarm every rank stops with a checkpoint


@dataclass
class SeerConfig:
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.mode": ("online", "fixed"),
    "data.backend": ("torch", "dali"),
    "method.name": ("swav", "mocov3"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.compile": ("off", "blocks", "full"),
    "train.memory_format": ("auto", "channels_last", "contiguous"),
    "optim.name": ("sgd", "lars", "adamw"),
    "schedule.mode": ("cosine", "plateau"),
    "augment.device": ("auto", "cpu", "cuda"),
    "parallel.strategy": ("fsdp", "ddp"),
    "parallel.sharding": ("full", "hybrid"),
}

POSITIVE: tuple[str, ...] = (
    "train.batch_size",
    "train.max_steps",
    "train.log_every",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "data.poll_seconds",
    "data.max_pixels",
)
