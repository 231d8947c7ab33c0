"""The batched color stage (GPUs) launches >= 5x fewer kernels per view than the masked-index
version it replaced, never waits for the device, and keeps the per-sample path's numbers; its
compiled form (inductor) agrees with it. Kernels are counted on the CPU with a dispatch-mode
counter (``seer.profiling``); the statistics tests are tests/test_crops_augment.py's."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO
from data_pipeline.augment import ColorAugmentSpec, color_augment, sample_color_params
from data_pipeline.color_batched import apply_batched
from seer.profiling import DeviceWork

sys.path.insert(0, str(REPO / "benchmarks"))
from color_stage import SPECS, batched_before  # noqa: E402  (the implementation seer had, as reference)


def _view(spec_name: str, batch: int, size: int):
    spec = ColorAugmentSpec(**SPECS[spec_name])
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return images, spec, sample_color_params(batch, spec, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spec_name,batch", [("seer", 32), ("seer", 128), ("mocov3_view2", 64)])
def test_five_times_fewer_kernels_and_no_waits(spec_name, batch):
    images, spec, params = _view(spec_name, batch, 40)
    counted = {}
    for name, fn in (("before", batched_before), ("after", apply_batched)):
        with DeviceWork() as work:
            out = fn(images, spec, params)
        counted[name] = work
        assert out.shape == images.shape and out.dtype == torch.float32
    before, after = counted["before"], counted["after"]
    assert after.kernel_count * 5 <= before.kernel_count, (before.kernel_count, after.kernel_count)
    assert after.kernel_count <= 75  # whatever the batch size
    assert before.waits and not after.waits  # the old path waited at every boolean index
    torch.testing.assert_close(apply_batched(images, spec, params), batched_before(images, spec, params),
                               rtol=0, atol=1e-4)


def test_channels_last_output_and_per_sample_agreement():
    images, spec, _ = _view("mocov3_view2", 16, 24)
    a = color_augment(images, spec, torch.Generator().manual_seed(2), method="batched",
                      memory_format=torch.channels_last)
    b = color_augment(images, spec, torch.Generator().manual_seed(2), method="per_sample")
    assert a.is_contiguous(memory_format=torch.channels_last) and b.is_contiguous()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_compiled_color_stage_agrees_with_eager():
    images, spec, params = _view("seer", 8, 24)
    torch.testing.assert_close(apply_batched(images, spec, params, compiled=True), apply_batched(images, spec, params),
                               rtol=0, atol=1e-4)
