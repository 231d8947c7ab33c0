"""``torch.compile`` of one module's forward, in place, falling back to eager if it cannot compile.

:func:`compile_forward` replaces ``module.forward`` (an instance attribute, a bound method) by a
:class:`CompiledForward`: the class's own ``forward`` under ``torch.compile``. Everything around
the forward stays eager and unchanged: the module object, its class, its state-dict keys, and the
hooks FSDP2 and activation checkpointing put around its call (``seer.engine.parallel`` compiles
blocks first, then wraps them; torchtitan's order). ``torch.compile`` is lazy, so a module that
cannot be compiled shows it at its first call (or at a recompile): the error is caught, ONE
warning names the module and says why, and that module runs eagerly from then on; the run goes on.
(Inductor may compile a graph's backward at its first backward pass; a failure there is raised,
not caught: the forward already ran compiled.)

Every module of a class shares one dynamo cache (one code object): blocks of the same shape reuse
one graph. Different stage widths, crop sizes and grad modes each add an entry, so the recompile
limit is raised to :data:`RECOMPILE_LIMIT` (the default, 8, is below a RegNet's count).
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64  # graphs per code object: (stage, first block or not) x crop sizes x grad mode


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compile raises: dynamo's errors (inductor's are wrapped in them), and the
    C++/Triton compiler errors of inductor where they surface unwrapped."""
    errors: list[type[BaseException]] = [torch._dynamo.exc.TorchDynamoException]
    try:
        from torch._inductor import exc as inductor_exc

        errors += [getattr(inductor_exc, name) for name in ("InductorError", "CppCompileError", "LoweringException")
                   if hasattr(inductor_exc, name)]
    except ImportError:  # pragma: no cover - a torch without inductor
        pass
    return tuple(errors)


def prepare_dynamo(deterministic: bool = False) -> None:
    """Process-wide settings for per-module compilation (idempotent)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.7; 2.6 has the second
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    if deterministic and hasattr(torch._inductor.config, "deterministic"):
        torch._inductor.config.deterministic = True  # no autotuning by timing: the same kernels every run


class CompiledForward:
    """A module's forward under ``torch.compile``; eager after the first failure (one warning).

    Bound to its module as ``module.forward``; shared by ``copy.deepcopy`` copies of the module
    (a deep-copied bound method keeps the function and rebinds to the copy), which is right: the
    compiled code takes the module as an argument."""

    def __init__(self, eager: types.FunctionType, name: str, *, fullgraph: bool = True):
        self.eager = eager
        self.name = name
        self.compiled = torch.compile(eager, fullgraph=fullgraph, dynamic=False)
        self.failed: str | None = None  # why it fell back to eager

    def __call__(self, module: nn.Module, *args, **kwargs):
        if self.failed is None:
            try:
                return self.compiled(module, *args, **kwargs)
            except _compile_errors() as err:
                first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
                self.failed = f"{type(err).__name__}: {first_line}"
                log.warning("torch.compile failed for %s (%s); it runs eagerly from now on", self.name, self.failed)
        return self.eager(module, *args, **kwargs)


def compile_forward(module: nn.Module, name: str, *, fullgraph: bool = True) -> CompiledForward:
    """Compile ``module``'s forward in place (see the module doc); returns the compiled forward."""
    eager = type(module).forward
    compiled = CompiledForward(eager, name, fullgraph=fullgraph)
    module.forward = types.MethodType(compiled, module)
    return compiled


def compiled_forward_of(module: nn.Module) -> CompiledForward | None:
    """The :class:`CompiledForward` installed on ``module``, if any."""
    forward = module.__dict__.get("forward")
    function = getattr(forward, "__func__", None)
    return function if isinstance(function, CompiledForward) else None
