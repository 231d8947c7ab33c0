"""The measuring half of ``benchmarks/fsdp_memory.py`` (see its docstring for the method): the
benchmark's configs, the per-rank FSDP2 memory run (one spawned gloo process per rank) and the
step-overhead timing (minimal loop vs seer's step, and the pieces seer's step adds, timed alone).
The CLI, the table and the doc section are ``fsdp_memory.py``'s.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cluster.local import free_port  # noqa: E402
from data_pipeline.storage import atomic_write_bytes  # noqa: E402

MEMORY_OVERRIDES = [  # model state must dominate: 82M parameters (314 MiB in fp32), a tiny batch
    "model.backbone=regnety_16gf",
    "augment.crops=[{size: 64, count: 2, scale: [0.14, 1.0]}]",
    "train.batch_size=2",
    "method.swav.freeze_prototypes_steps=0",  # every parameter gets a gradient and a momentum buffer
    "optim.name=lars",
    "train.device=cpu",
]
STEP_OVERRIDES = [  # the quickstart's model and crops, a smaller batch
    "train.batch_size=4",
    "method.swav.freeze_prototypes_steps=0",
    "optim.name=sgd",
    "train.device=cpu",
]


def load(overrides: list[str]):
    from seer.config import load_config

    return load_config(REPO / "configs" / "quickstart.yaml", overrides)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())


def views_for(cfg, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(cfg.train.batch_size, 3, c.size, c.size, generator=g) for c in cfg.augment.crops
            for _ in range(c.count)]


# ---------------------------------------------------------------------------------------------
# 1. memory per rank


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def _memory_rank(rank: int, world_size: int, port: int, out_dir: str, construction: str) -> None:
    """``construction``: "eager" builds the full fp32 model on every rank, then shards it (seer
    before); "meta" builds it on the meta device and materialises the local shards (seer now)."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    from seer.engine.distributed import DistInfo
    from seer.engine.optim import build_optimizer
    from seer.engine.parallel import parallelize, unwrap
    from seer.methods import build_method

    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = load(MEMORY_OVERRIDES)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    if construction == "meta":
        with torch.device("meta"):
            method = build_method(cfg)
    else:
        method = build_method(cfg)
    built_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info = DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    model, _ = parallelize(method, info, cfg.parallel, cfg.train.precision, seed=cfg.seed)
    sharded_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    optimizer = build_optimizer(unwrap(model), cfg.optim, cfg.train.batch_size * world_size)
    views = views_for(cfg, seed=rank)
    started = time.perf_counter()
    loss = model(views)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    unwrap(model).on_after_backward(0)
    optimizer.step()
    step_s = time.perf_counter() - started
    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    result = {
        "rank": rank,
        "construction": construction,
        "param_elements_local": sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params),
        "param_elements_full": sum(p.numel() for p in params),
        "param_bytes": sum(_local_bytes(p) for p in params),
        "grad_bytes": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer_bytes": sum(_local_bytes(t) for t in state),
        "maxrss_baseline_kib": baseline_kib,
        "maxrss_after_build_kib": built_kib,
        "maxrss_after_parallelize_kib": sharded_kib,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "rss_after_step_kib": int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024,
        "step_s": step_s,
    }
    result["model_state_bytes"] = result["param_bytes"] + result["grad_bytes"] + result["optimizer_bytes"]
    write_atomic(Path(out_dir) / f"rank{rank}.json", json.dumps(result))
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure_memory(world_sizes: list[int], constructions: tuple[str, ...] = ("eager", "meta")) -> list[dict]:
    import torch.multiprocessing as mp

    from seer.plan import shard_elements

    with torch.device("meta"):
        from seer.methods import build_method

        meta_params = list(build_method(load(MEMORY_OVERRIDES)).parameters())
    rows = []
    for construction, world_size in ((c, n) for n in world_sizes for c in constructions):
        with tempfile.TemporaryDirectory() as out_dir:
            started = time.perf_counter()
            mp.spawn(_memory_rank, args=(world_size, free_port(), out_dir, construction), nprocs=world_size, join=True)
            ranks = [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world_size)]
        rows.append({
            "construction": construction,
            "world_size": world_size,
            "wall_s": time.perf_counter() - started,
            "plan_rank0_param_elements": shard_elements(meta_params, world_size),
            "ranks": ranks,
        })
        print(f"  {construction}, world size {world_size}: {time.perf_counter() - started:.1f} s", flush=True)
    for row in rows:
        base = max(r["model_state_bytes"] for first in rows if first["construction"] == row["construction"]
                   and first["world_size"] == world_sizes[0] for r in first["ranks"])
        worst = max(r["model_state_bytes"] for r in row["ranks"])
        row["model_state_max_bytes"] = worst
        row["ratio_to_world1"] = worst / base
        row["ratio_times_n"] = worst / base * row["world_size"]
        row["maxrss_max_mib"] = max(r["maxrss_kib"] for r in row["ranks"]) / 1024
        row["maxrss_delta_max_mib"] = max(r["maxrss_kib"] - r["maxrss_baseline_kib"] for r in row["ranks"]) / 1024
        row["rss_after_step_delta_max_mib"] = max(
            r["rss_after_step_kib"] - r["maxrss_baseline_kib"] for r in row["ranks"]) / 1024
    return rows


# ---------------------------------------------------------------------------------------------
# 2. step overhead


def measure_step_overhead(steps_per_block: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    from seer.engine.guard import StabilityGuard
    from seer.engine.metrics import MetricsLogger
    from seer.engine.optim import build_optimizer, build_schedule, set_lr
    from seer.engine.parallel import Precision, unwrap
    from seer.engine.train import train_step
    from seer.methods import build_method

    cfg = load(STEP_OVERRIDES)
    lars_cfg = load([*STEP_OVERRIDES, "optim.name=lars"])
    torch.manual_seed(0)
    reference = build_method(cfg)
    views = views_for(cfg)
    device = torch.device("cpu")
    batch = cfg.train.batch_size
    run_dir = Path(tempfile.mkdtemp(prefix="seer_bench_"))

    def minimal():
        model = copy.deepcopy(reference)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(_: int) -> None:
            loss = model(views)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        return step

    def seer(config, name):
        model = copy.deepcopy(reference)
        optimizer = build_optimizer(model, config.optim, batch)
        schedule = build_schedule(config.schedule, config.optim, batch, 10**6)
        guard = StabilityGuard(config.guard)
        precision = Precision.for_model(model, config.train.precision, device)
        (run_dir / name).mkdir()
        metrics = MetricsLogger(run_dir / name, enabled=True, start_step=0, max_steps=10**6, log_every=10**6)

        def step(index: int) -> None:  # seer.engine.train.pretrain's loop body, minus data and checkpoints
            lr = schedule.lr(index)
            set_lr(optimizer, lr)
            verdict, global_loss, grad_norm = train_step(
                model, optimizer, precision, guard, views, index, grad_clip=config.train.grad_clip,
            )
            done, loss_value = index + 1, float(global_loss)
            schedule.observe(done, loss_value)
            unwrap(model).check_collapse(loss_value, done)
            scalars = {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), "data_skipped": 0}
            if done % config.guard.grad_norm_every == 0:
                scalars.update({f"grad_norm/{k}": v for k, v in guard.grad_norms(unwrap(model)).items()})
            metrics.log_step(done, batch, scalars)

        return step, metrics

    variants = {"minimal": minimal()}
    variants["seer_sgd"], logger_sgd = seer(cfg, "sgd")
    variants["seer_lars"], logger_lars = seer(lars_cfg, "lars")
    counters = {name: 0 for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(repeats + 1):  # repeat 0 warms up and is dropped
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(steps_per_block):
                variants[name](counters[name])
                counters[name] += 1
            if repeat:
                wall[name].append((time.perf_counter() - wall_start) / steps_per_block)
                cpu[name].append((time.process_time() - cpu_start) / steps_per_block)
        if repeat:
            print(f"  repeat {repeat}: " + ", ".join(f"{n} {cpu[n][-1] * 1e3:.0f} ms CPU / {wall[n][-1] * 1e3:.0f} ms wall"
                                                    for n in names), flush=True)
    logger_sgd.close()
    logger_lars.close()
    components = measure_components(reference, views, cfg, lars_cfg, run_dir)
    median = {name: statistics.median(values) for name, values in cpu.items()}
    median_wall = {name: statistics.median(values) for name, values in wall.items()}
    return {
        "model": cfg.model.backbone,
        "batch_size": batch,
        "crops": [f"{c.count}x{c.size}" for c in cfg.augment.crops],
        "threads": torch.get_num_threads(),
        "steps_per_block": steps_per_block,
        "repeats": repeats,
        "cpu_step_s": cpu,
        "wall_step_s": wall,
        "median_step_s": median,
        "median_wall_step_s": median_wall,
        "ratio_seer_sgd_to_minimal": median["seer_sgd"] / median["minimal"],
        "ratio_seer_lars_to_minimal": median["seer_lars"] / median["minimal"],
        "wall_ratio_seer_sgd_to_minimal": median_wall["seer_sgd"] / median_wall["minimal"],
        "wall_ratio_seer_lars_to_minimal": median_wall["seer_lars"] / median_wall["minimal"],
        "components_ms": components,
        "loop_components_ratio": loop_ratio(components, median["minimal"]),
    }


def loop_ratio(components: dict[str, float], minimal_s: float) -> float:
    """1 + (the loop's pieces, LARS excluded, negative differences counted as 0) / step (a)."""
    return 1 + sum(max(ms, 0.0) for name, ms in components.items() if not name.startswith("LARS")) / 1e3 / minimal_s


def measure_components(reference, views, cfg, lars_cfg, run_dir: Path, reps: int = 50) -> dict[str, float]:
    """CPU milliseconds of each piece seer's step adds, timed alone on a model holding real gradients
    (a steadier estimate of (b) - (a) than the difference of two noisy step times)."""
    from seer.engine.guard import StabilityGuard
    from seer.engine.metrics import MetricsLogger
    from seer.engine.optim import build_optimizer, build_schedule, set_lr

    model = copy.deepcopy(reference)
    model(views)["loss"].backward()
    params = [p for p in model.parameters() if p.grad is not None]
    batch = cfg.train.batch_size
    plain = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=0.9)
    seer_sgd = build_optimizer(model, cfg.optim, batch)
    seer_lars = build_optimizer(model, lars_cfg.optim, batch)
    schedule = build_schedule(cfg.schedule, cfg.optim, batch, 10**6)
    guard = StabilityGuard(cfg.guard)
    (run_dir / "components").mkdir()
    metrics = MetricsLogger(run_dir / "components", enabled=True, start_step=0, max_steps=10**6, log_every=10**6)
    counter = iter(range(1, 10**9))

    def cpu_ms(fn) -> float:
        fn()
        started = time.process_time()
        for _ in range(reps):
            fn()
        return (time.process_time() - started) / reps * 1e3

    scalars = {"loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "data_skipped": 0}
    plain_ms = cpu_ms(plain.step)
    result = {
        "schedule.lr + set_lr": cpu_ms(lambda: set_lr(seer_sgd, schedule.lr(next(counter)))),
        "clip_grad_norm_ (total norm)": cpu_ms(lambda: torch.nn.utils.clip_grad_norm_(params, float("inf"))),
        "StabilityGuard.check": cpu_ms(lambda: guard.check(next(counter), 1.0, 1.0)),
        f"grad_norms / {cfg.guard.grad_norm_every}": cpu_ms(lambda: guard.grad_norms(model)) / cfg.guard.grad_norm_every,
        "MetricsLogger.log_step": cpu_ms(lambda: metrics.log_step(next(counter), batch, scalars)),
        "seer SGD step - torch SGD step": cpu_ms(seer_sgd.step) - plain_ms,
        "LARS step - torch SGD step": cpu_ms(seer_lars.step) - plain_ms,
    }
    metrics.close()
    return result
