"""Measuring for ``seer plan``: one forward of the method on fake tensors, and what it saved and computed.

The method is built on the meta device and one forward runs on fake tensors of the real crop shapes
(``FakeTensorMode``: meta storage, no memory, no compute, but a CPU device so that methods may call
``torch.autocast(device)``):

- activations = the bytes of the tensors autograd saves for backward, summed under
  ``torch.autograd.graph.saved_tensors_hooks`` once per storage (views and in-place results are
  one storage), parameters excluded (they are counted as parameters). The forward runs with
  parameters and inputs in the compute dtype, which is how FSDP2's
  ``MixedPrecisionPolicy(param_dtype=...)`` runs it (autocast has no meta backend);
- activation checkpointing (non-reentrant, per block of the checkpointed stages) is derived from
  the same forward: forward hooks on every block record which storages each block call saved and
  its input; checkpointed calls keep only their inputs, and backward recomputes one call at a time
  (the largest is added);
- FLOPs = ``torch.utils.flop_counter.FlopCounterMode`` over the same forward (matmuls,
  convolutions, attention; element-wise ops are not counted), and apart the FLOPs of the method's
  parts called without gradients (MoCo v3's momentum encoder): they have no backward.

Also the FSDP2 units and checkpointed blocks as ``seer.engine.parallel`` makes them. The arithmetic
on top (sharding, totals, verdicts) is ``seer.plan``'s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from seer.config import SeerConfig


@dataclass
class ForwardProfile:
    """What one forward saved for backward and computed (see the module doc)."""

    storage_bytes: dict[int, int] = field(default_factory=dict)  # storage key -> bytes
    saved_in: dict[int, set[int]] = field(default_factory=dict)  # storage key -> block calls (-1: outside)
    calls: list[dict] = field(default_factory=list)  # per block call: block, input_key, input_bytes, flops
    flops: int = 0
    no_grad_flops: int = 0  # of it, in calls of the model's children made without gradients

    @property
    def model_step_flops(self) -> int:
        """Forward + backward (3 x) of what runs with gradients, forward only of the rest."""
        return 3 * (self.flops - self.no_grad_flops) + self.no_grad_flops

    @property
    def saved_bytes(self) -> int:
        return sum(self.storage_bytes.values())

    def checkpointed(self, blocks: set[int]) -> dict[str, int]:
        """Activation bytes when the calls of ``blocks`` are checkpointed: what they keep (their
        inputs), what the rest keeps, and the largest single call recomputed in backward."""
        # a call under no_grad (MoCo's momentum encoder) saves nothing, checkpointed or not
        ckpt = {i for i, call in enumerate(self.calls) if call["block"] in blocks and call["grad"]}
        kept = {key for key, where in self.saved_in.items() if where - ckpt}
        sizes = dict(self.storage_bytes)
        for i in ckpt:
            kept.add(self.calls[i]["input_key"])
            sizes.setdefault(self.calls[i]["input_key"], self.calls[i]["input_bytes"])
        inputs = {self.calls[i]["input_key"] for i in ckpt}
        recompute = max(
            (sum(b for key, b in self.storage_bytes.items() if i in self.saved_in[key] and key not in kept) for i in ckpt),
            default=0,
        )
        return {
            "kept_outside_checkpointed_blocks": sum(sizes[k] for k in kept - inputs),
            "checkpointed_block_inputs": sum(sizes[k] for k in inputs),
            "largest_block_recompute": recompute,
            "recompute_flops": sum(self.calls[i]["flops"] for i in ckpt),
        }


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def profile_forward(model: nn.Module, blocks: list[nn.Module], run: Callable[[], object]) -> ForwardProfile:
    """Run ``run()`` (a forward of ``model``) under the saved-tensor hooks, block hooks and a
    FlopCounterMode. Works on meta and real tensors alike; the result of ``run`` is kept alive
    until the bytes are counted so no storage key can be reused."""
    profile = ForwardProfile()
    param_keys = {_key(p) for p in model.parameters()}
    alive: list[object] = []
    active: list[int] = []
    counter = FlopCounterMode(display=False)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _key(tensor)
        if key not in param_keys:
            alive.append(tensor)
            profile.storage_bytes[key] = tensor.untyped_storage().nbytes()
            profile.saved_in.setdefault(key, set()).add(active[-1] if active else -1)
        return tensor

    def before(index: int, module: nn.Module, args: tuple) -> None:
        first = args[0] if args and isinstance(args[0], torch.Tensor) else torch.empty(0)
        alive.append(first)
        active.append(len(profile.calls))
        profile.calls.append({"block": index, "input_key": _key(first), "input_bytes": first.untyped_storage().nbytes(),
                              "grad": torch.is_grad_enabled(), "flops": -counter.get_total_flops()})

    def after(module: nn.Module, args: tuple, output: object) -> None:
        profile.calls[active.pop()]["flops"] += counter.get_total_flops()

    outer: list[int | None] = []  # FLOPs counted when a child of the model was entered without gradients

    def outer_before(module: nn.Module, args: tuple) -> None:
        outer.append(None if torch.is_grad_enabled() else counter.get_total_flops())

    def outer_after(module: nn.Module, args: tuple, output: object) -> None:
        start = outer.pop()
        if start is not None:
            profile.no_grad_flops += counter.get_total_flops() - start

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(functools.partial(before, index)))
        handles.append(block.register_forward_hook(after))
    for child in model.children():
        handles.append(child.register_forward_pre_hook(outer_before))
        handles.append(child.register_forward_hook(outer_after))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), counter:
            alive.append(run())
    finally:
        for handle in handles:
            handle.remove()
    profile.flops = counter.get_total_flops()
    return profile


def fsdp_units(method: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(blocks, heads) as ``seer.engine.parallel.shard_fsdp2`` makes them FSDP2 units: every block
    of every backbone, every other child of the method that has parameters; the root holds the rest."""
    from seer.engine.parallel import backbones, units

    if not backbones(method):
        raise ValueError(f"{type(method).__name__} has no backbone with blocks() to plan for")
    return units(method)


def checkpointed_blocks(method: nn.Module, stages: list[int] | None) -> list[nn.Module]:
    """The blocks ``seer.engine.parallel.checkpoint_blocks`` wraps for ``parallel.checkpoint_stages``."""
    from seer.engine.parallel import backbones, stages_of

    chosen = []
    for backbone in backbones(method):
        per_stage = stages_of(backbone)
        for index in range(len(per_stage)) if stages is None else stages:
            if not 0 <= index < len(per_stage):
                raise ValueError(f"parallel.checkpoint_stages: stage {index} does not exist ({len(per_stage)} stages)")
            chosen.extend(per_stage[index])
    return chosen


def _fake_cpu(method: nn.Module, mode: FakeTensorMode, dtype: torch.dtype) -> None:
    """Replace the meta parameters and buffers by fake CPU tensors (meta storage, no data) in
    ``dtype``; 0-d integer buffers (step counters a method may branch on) become real zeros."""
    def fake(t: torch.Tensor) -> torch.Tensor:
        with mode:
            return torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype)

    for module in method.modules():
        for name, p in [(n, p) for n, p in module._parameters.items() if p is not None]:
            module._parameters[name] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in [(n, b) for n, b in module._buffers.items() if b is not None]:
            scalar = b.ndim == 0 and not b.is_floating_point()
            module._buffers[name] = torch.zeros((), dtype=b.dtype) if scalar else fake(b)


def measure_method(cfg: SeerConfig, dtype: torch.dtype, real: bool = False) -> tuple[nn.Module, ForwardProfile]:
    """Build the method and profile one forward of ``train.batch_size`` images with every crop.

    Default: built on the meta device, then run on fake CPU tensors (meta storage: no memory, no
    compute; reporting a CPU device lets methods use ``torch.autocast(x.device.type, ...)``).
    ``real=True``: real CPU tensors (for tests: the numbers must agree)."""
    from seer.methods import build_method

    with torch.device("cpu" if real else "meta"):
        method = build_method(cfg)
    shapes = [(cfg.train.batch_size, 3, g.size, g.size) for g in cfg.augment.crops for _ in range(g.count)]
    blocks = fsdp_units(method)[0]
    try:
        if real:
            method.to(dtype)
            views = [torch.randn(shape).to(dtype) for shape in shapes]
            return method, profile_forward(method, blocks, lambda: method(views))
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        _fake_cpu(method, mode, dtype)
        with mode:
            views = [torch.empty(shape, dtype=dtype) for shape in shapes]
            return method, profile_forward(method, blocks, lambda: method(views))
    except (RuntimeError, NotImplementedError) as err:
        raise ValueError(
            f"cannot run a {cfg.method.name} forward of {cfg.model.backbone} without data to measure it: "
            f"{str(err).splitlines()[0]}"
        ) from err
