"""Counting what code asks of the device, on any device (the CPU included): kernels and host reads.

``with DeviceWork() as work: ...`` records

- ``kernels``: every ATen operator that does work (what launches a kernel on a GPU): views,
  aliases and uninitialised allocations are left out, everything else counts once per call, by
  name (``work.kernels["aten.add.Tensor"]``; ``work.kernel_count`` is the total);
- ``host_reads``: every read of a tensor's value into Python (``item``, ``tolist``, ``float()``,
  ``int()``, ``bool()``, ``numpy``): on a GPU each is a host synchronisation;
- ``collectives``: c10d operators (all-reduce, all-gather, ...) issued, by name;
- ``waits``: kernels whose output size depends on the data (``nonzero``, boolean-mask indexing,
  ``masked_select``): on a GPU each waits for the device, like a host read.

A dispatch mode (kernels, collectives) and a function mode (host reads) see the real calls; nothing
is mocked. Used by the tests that bound the color stage's kernels and the step's host syncs, and
by the benchmarks that report them.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = frozenset({"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy"})
_WAITS = frozenset({"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"})
_NO_WORK = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
                      "_local_scalar_dense"})  # the last is counted as a host read


class _Kernels(TorchDispatchMode):
    def __init__(self, kernels: Counter, collectives: Counter, waits: Counter):
        super().__init__()
        self.kernels, self.collectives, self.waits = kernels, collectives, waits

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name  # e.g. "aten::add", "c10d::allreduce_"
        if name.startswith("c10d::"):
            self.collectives[name] += 1
        elif not func.is_view and name.split("::")[-1] not in _NO_WORK:
            self.kernels[str(func)] += 1
            short = name.split("::")[-1]
            bool_index = short.startswith("index") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 and
                                                                             isinstance(args[1], (list, tuple)) else ()))
            if short in _WAITS or bool_index:
                self.waits[str(func)] += 1
        return func(*args, **(kwargs or {}))


class _HostReads(TorchFunctionMode):
    def __init__(self, reads: list[str]):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


class DeviceWork:
    """Context manager counting kernels, host reads and collectives (see the module doc)."""

    def __init__(self) -> None:
        self.kernels: Counter = Counter()
        self.collectives: Counter = Counter()
        self.waits: Counter = Counter()
        self.host_reads: list[str] = []
        self._modes: list = []

    @property
    def kernel_count(self) -> int:
        return sum(self.kernels.values())

    def __enter__(self) -> "DeviceWork":
        self._modes = [_HostReads(self.host_reads), _Kernels(self.kernels, self.collectives, self.waits)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
