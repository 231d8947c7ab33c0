"""The measuring half of ``benchmarks/gpu_step.py`` (see its docstring): seer's train step as
``seer.engine.setup.build_parts`` builds it, the plain-PyTorch loop of the same work, the color
stage alone, and the model FLOPs the MFU is computed from.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch


def model_flops_per_step(cfg) -> float:
    """``seer.plan_measure``'s model FLOPs of one rank's step: 3 x forward with gradients + forward
    without (fake tensors: nothing runs)."""
    from seer.engine.parallel import DTYPES
    from seer.plan_measure import measure_method

    return float(measure_method(cfg, DTYPES[cfg.train.precision])[1].model_step_flops)


def synthetic_views(cfg, device: torch.device, memory_format: torch.memory_format) -> list[torch.Tensor]:
    """Normalised float views of the config's crops (what the color stage hands the model)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(cfg.train.batch_size, 3, group.size, group.size, generator=g).to(device)
            .contiguous(memory_format=memory_format) for group in cfg.augment.crops for _ in range(group.count)]


def seer_step(cfg, device: torch.device, compile_mode: str):
    """seer's step as a run makes it: built on the meta device, ``parallelize`` (compile, memory
    format, checkpointing, precision), seer's optimizer, LR and guard, ``train_step``."""
    from seer.engine.distributed import DistInfo
    from seer.engine.guard import StabilityGuard
    from seer.engine.optim import build_optimizer, build_schedule, set_lr
    from seer.engine.parallel import parallelize, resolve_memory_format, unwrap
    from seer.engine.train import train_step
    from seer.methods import build_method

    with torch.device("meta"):
        method = build_method(cfg)
    layout = resolve_memory_format(cfg.train.memory_format, method.backbone, device)
    model, precision = parallelize(method, DistInfo(0, 1, 0, device), cfg.parallel, cfg.train.precision,
                                   seed=cfg.seed, compile_mode=compile_mode, memory_format=layout)
    optimizer = build_optimizer(unwrap(model), cfg.optim, cfg.train.batch_size)
    schedule = build_schedule(cfg.schedule, cfg.optim, cfg.train.batch_size, 10**6)
    guard = StabilityGuard(cfg.guard)
    views = synthetic_views(cfg, device, layout)
    model.train()

    def step(index: int) -> None:
        set_lr(optimizer, schedule.lr(index))
        train_step(model, optimizer, precision, guard, views, index, grad_clip=cfg.train.grad_clip)

    return step, layout


def timm_backbone(cfg) -> torch.nn.Module:
    """timm's model of the same design as seer's backbone (features, no classifier)."""
    from seer.models import REGNET_DESIGNS, VIT_DESIGNS

    name = cfg.model.backbone
    if name in VIT_DESIGNS:
        from timm.models.vision_transformer import VisionTransformer

        d = VIT_DESIGNS[name]
        return VisionTransformer(img_size=cfg.model.kwargs.get("img_size", 224), patch_size=d.patch_size,
                                 embed_dim=d.embed_dim, depth=d.depth, num_heads=cfg.model.kwargs.get("num_heads", d.num_heads),
                                 num_classes=0)
    from timm.models.regnet import RegNet, RegNetCfg

    d = REGNET_DESIGNS[name]
    return RegNet(RegNetCfg(depth=d.depth, w0=d.w_0, wa=d.w_a, wm=d.w_m, group_size=d.group_width,
                            bottle_ratio=d.bottleneck_multiplier, se_ratio=d.se_ratio, stem_width=d.stem_width),
                  num_classes=0)


def plain_step(cfg, device: torch.device, compiled: bool, layout: torch.memory_format):
    """The same work written plainly: timm's backbone inside seer's method module (its heads and
    loss), torch.autocast, torch's optimizer (SGD with momentum for LARS, AdamW), a GradScaler for
    fp16, the MoCo momentum update; timm's own checkpointing where the config checkpoints; no
    guard, no norms, no seer engine. ``compiled``: the whole module under torch.compile."""
    from seer.engine.parallel import DTYPES
    from seer.methods import METHODS

    torch.manual_seed(cfg.seed)
    backbone = timm_backbone(cfg)
    if cfg.parallel.activation_checkpointing:
        backbone.set_grad_checkpointing(True)
    model = METHODS[cfg.method.name].from_config(backbone, cfg).to(device).to(memory_format=layout)
    lr = cfg.optim.lr * cfg.train.batch_size / 256
    optimizer = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.optim.weight_decay)
                 if cfg.optim.name == "adamw" else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    dtype = DTYPES[cfg.train.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    forward = torch.compile(model) if compiled else model
    views = synthetic_views(cfg, device, layout)
    model.train()

    def step(index: int) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(views)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        model.after_step(index)

    return step


def timed(step, device: torch.device, warmup: int, steps: int, batch: int) -> dict:
    """Images/s over ``steps`` after ``warmup`` (compiles happen there), and peak memory."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for index in range(warmup):
        step(index)
    sync()
    warm_s = time.perf_counter() - started
    started = time.perf_counter()
    for index in range(warmup, warmup + steps):
        step(index)
    sync()
    elapsed = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"images_per_s": batch * steps / elapsed, "step_s": elapsed / steps, "warmup_s": warm_s,
            "peak_memory_bytes": peak, "peak_memory_kind": "max_memory_allocated" if device.type == "cuda"
            else "process ru_maxrss (cumulative)"}


def color_stage(cfg, device: torch.device, method: str, layout: torch.memory_format, repeats: int = 5) -> dict:
    """The color stage alone for one step's views on ``device``: ms per step (all views)."""
    from data_pipeline.augment import color_augment
    from seer.engine.data import color_specs

    specs = color_specs(cfg)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (cfg.train.batch_size, 3, group.size, group.size), dtype=torch.uint8,
                            generator=g).to(device) for group in cfg.augment.crops for _ in range(group.count)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run() -> None:
        for i, (view, spec) in enumerate(zip(images, specs)):
            color_augment(view, spec, torch.Generator().manual_seed(i), method=method, memory_format=layout)

    run()  # warm-up (and compile)
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    return {"method": method, "ms_per_step": step_s * 1e3, "images_per_s": cfg.train.batch_size / step_s}
