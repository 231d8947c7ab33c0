"""Multi-crop: crop boxes as RandomResizedCrop draws them (exactly, and in distribution), the
decode at the smallest useful DCT scale, uint8 views, and the color stage against
torchvision's per-image ops (exactly per op, and in distribution for the whole jitter); the CPU
color path's tests run on both its executions (numba's fused kernels where numba is installed, numpy)."""

import io
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import RandomResizedCrop

import data_pipeline
from data_pipeline import color_cpu
from data_pipeline import crops as crops_module
from data_pipeline.augment import (
    ColorAugmentSpec,
    ColorParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_augment,
    gaussian_blur,
)
from data_pipeline.crops import CropBox, CropSpec, MultiCrop, dct_factor, min_decode_side, sample_crop_box
from data_pipeline.decode import DecodeError, decode_image
from images import exif_rotated_jpeg, photo, truncated


@pytest.fixture
def one_thread():
    """Tiny per-image torch ops: a second OpenMP thread only adds contention (much slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["numba", "numpy"])
def cpu_backend(request, monkeypatch):
    """Both executions of the CPU color path (data_pipeline.color_cpu): numba's fused kernels and numpy."""
    if request.param == "numba":
        pytest.importorskip("numba", reason="numba is not installed: the numpy path only")
    monkeypatch.setattr(color_cpu, "BACKEND", request.param)
    return request.param


def ks_distance(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(np.asarray(a)), np.sort(np.asarray(b))
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@pytest.mark.parametrize("size,scale", [((640, 480), (0.14, 1.0)), ((300, 900), (0.05, 0.14)), ((50, 400), (0.08, 1.0))])
def test_crop_boxes_equal_random_resized_crop(size, scale):
    """Same generator state -> exactly the boxes torchvision's get_params returns."""
    img = Image.new("RGB", size)
    ratio = (3 / 4, 4 / 3)
    torch.manual_seed(0)
    reference = [RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(500)]
    torch.manual_seed(0)
    ours = [sample_crop_box(size[0], size[1], scale, ratio, torch.default_generator) for _ in range(500)]
    assert [tuple(int(v) for v in r) for r in reference] == ours


@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.14)])
def test_crop_area_and_aspect_distribution_match_random_resized_crop(scale):
    """4000 MultiCrop boxes (independent seed) vs RandomResizedCrop: KS distance below the
    0.1% critical value (0.044) for area fraction and log aspect ratio."""
    width, height, n = 1100, 830, 4000
    multicrop = MultiCrop([CropSpec(96, 1, scale)])
    gen = torch.Generator().manual_seed(5)
    ours = [multicrop.sample_boxes(width, height, gen)[0] for _ in range(n)]
    torch.manual_seed(6)
    theirs = [RandomResizedCrop.get_params(Image.new("RGB", (width, height)), list(scale), [3 / 4, 4 / 3]) for _ in range(n)]
    area = width * height
    assert ks_distance([b.height * b.width / area for b in ours], [h * w / area for _, _, h, w in theirs]) < 0.044
    assert ks_distance(np.log([b.width / b.height for b in ours]), np.log([w / h for _, _, h, w in theirs])) < 0.044
    assert {b.size for b in ours} == {96}


def test_multicrop_views():
    crop = MultiCrop([CropSpec(64, 2, (0.14, 1.0)), CropSpec(32, 3, (0.05, 0.14))])
    img = Image.new("RGB", (200, 150), (10, 200, 30))
    views = crop(img, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert all(v.dtype == torch.uint8 for v in views)
    assert views[0][:, 5, 5].tolist() == [10, 200, 30]
    again = crop(img, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    assert min_decode_side([CropSpec(224, 2, (0.14, 1.0)), CropSpec(96, 6, (0.05, 0.14))]) == 599


def test_flip_happens_about_half_the_time():
    crop = MultiCrop([CropSpec(8, 1, (1.0, 1.0), (1.0, 1.0))], flip_p=0.5)
    img = Image.new("RGB", (8, 8))
    img.putpixel((0, 0), (255, 255, 255))
    flips = sum(crop(img, torch.Generator().manual_seed(s))[0][0, 0, 7].item() == 255 for s in range(400))
    assert 160 < flips < 240


def test_dct_factor_is_the_largest_that_never_upsamples():
    def box(h, w, size):
        return CropBox(0, 0, h, w, size, False)

    assert dct_factor([box(500, 900, 224)]) == 2  # shorter side 500 >= 2 * 224
    assert dct_factor([box(500, 900, 224), box(440, 440, 224)]) == 1  # 440 < 448
    assert dct_factor([box(800, 800, 96)]) == 8
    assert dct_factor([box(400, 390, 96)]) == 4 and dct_factor([box(95, 95, 96)]) == 1


@pytest.mark.parametrize("scale,size", [((0.14, 1.0), 224), ((0.05, 0.14), 96), ((0.5, 1.0), 32)])
def test_scaled_decode_crops_match_full_decode_crops(scale, size):
    """A real 1100x830 photo: crops from the DCT-reduced decode agree with the same boxes cut
    from the full decode (so the box scaling is right) up to resampling differences (and box
    edges rounded to the reduced grid), far closer than crops of other boxes."""
    data = jpeg(photo("chelsea.png", (1100, 830)))
    multicrop = MultiCrop([CropSpec(size, 4, scale)])
    for seed in range(3):
        fast = multicrop.from_bytes(data, torch.Generator().manual_seed(seed))
        full = multicrop(decode_image(data), torch.Generator().manual_seed(seed))
        other = multicrop(decode_image(data), torch.Generator().manual_seed(seed + 100))
        for a, b, c in zip(fast, full, other):
            same, different = (a.float() - b.float()).abs().mean(), (a.float() - c.float()).abs().mean()
            assert same < 4.5 and different > 3 * same


@pytest.mark.skipif(crops_module.simplejpeg is None, reason="simplejpeg not installed")
def test_simplejpeg_and_pillow_decodes_give_the_same_crops(monkeypatch):
    data = jpeg(photo("astronaut.png", (900, 700)))
    multicrop = MultiCrop([CropSpec(64, 3, (0.05, 1.0))])
    fast = multicrop.from_bytes(data, torch.Generator().manual_seed(1))
    monkeypatch.setattr(crops_module, "simplejpeg", None)
    pillow = multicrop.from_bytes(data, torch.Generator().manual_seed(1))
    for a, b in zip(fast, pillow):
        assert (a.float() - b.float()).abs().mean() < 1.0


def test_exif_rotation_is_applied_before_cropping():
    data = exif_rotated_jpeg(64, 32, orientation=6)  # displayed 32 wide, 64 high
    multicrop = MultiCrop([CropSpec(16, 2, (0.3, 1.0), (0.5, 2.0))])
    got = multicrop.from_bytes(data, torch.Generator().manual_seed(3))
    want = multicrop(decode_image(data), torch.Generator().manual_seed(3))
    assert all((a.float() - b.float()).abs().max() <= 8 for a, b in zip(got, want))


def test_unusable_bytes_raise_decode_error():
    multicrop = MultiCrop([CropSpec(16, 1, (0.5, 1.0))])
    with pytest.raises(DecodeError, match="truncated"):
        multicrop.from_bytes(truncated(jpeg(photo("coffee.png", (300, 200)))), torch.Generator())
    with pytest.raises(DecodeError, match="not_an_image"):
        multicrop.from_bytes(b"not an image at all" * 20, torch.Generator())


def _images(n=6, size=24, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "ours,theirs,low,high",
    [
        (adjust_brightness, TF.adjust_brightness, 0.2, 1.8),
        (adjust_contrast, TF.adjust_contrast, 0.2, 1.8),
        (adjust_saturation, TF.adjust_saturation, 0.2, 1.8),
        (adjust_hue, TF.adjust_hue, -0.2, 0.2),
    ],
)
def test_batched_color_ops_equal_torchvision_per_image(ours, theirs, low, high):
    x = _images()
    factors = torch.linspace(low, high, x.shape[0])
    batched = ours(x.clone(), factors)
    for i in range(x.shape[0]):
        expected = theirs(x[i], float(factors[i]))
        assert (batched[i] - expected).abs().max().item() <= 2e-5


def test_blur_equals_torchvision_gaussian_blur():
    """Each sample's kernel has radius ceil(3 sigma), as torchvision with that kernel size."""
    x = _images(3, 32)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    out = gaussian_blur(x, sigma)
    for i, size in enumerate([5, 7, 13]):
        expected = TF.gaussian_blur(x[i], kernel_size=[size, size], sigma=[float(sigma[i])] * 2)
        assert (out[i] - expected).abs().max().item() <= 1e-5


def _photo_crops(n_per_photo=250, size=16):
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
             "ihc.png", "hubble_deep_field.jpg"]
    multicrop = MultiCrop([CropSpec(size, n_per_photo, (0.02, 0.3))])
    views = []
    for k, name in enumerate(names):
        views += multicrop(photo(name, (400, 300)), torch.Generator().manual_seed(k))
    return torch.stack(views)


@pytest.mark.parametrize("per_photo,size", [(12, 24), (2, 136), (12, 9)])  # numpy: blurred in groups / one by one
def test_per_sample_and_batched_execution_agree(one_thread, cpu_backend, per_photo, size):
    crops = _photo_crops(per_photo, size)
    spec = ColorAugmentSpec(solarize_p=0.3)
    per_sample = color_augment(crops, spec, torch.Generator().manual_seed(4), method="per_sample")
    batched = color_augment(crops, spec, torch.Generator().manual_seed(4), method="batched")
    assert per_sample.shape == batched.shape == (len(crops), 3, size, size) and per_sample.is_contiguous()
    assert (per_sample - batched).abs().max().item() < 1e-4


def test_color_statistics_match_torchvision_color_jitter(one_thread, cpu_backend):
    """2000 real photo crops through color_augment and through torchvision's ColorJitter(0.8,
    0.8, 0.8, 0.2) p 0.8 + RandomGrayscale(0.2): per-image brightness, contrast and saturation
    distributions agree (KS distance below the 0.1% critical value 0.062)."""
    crops = _photo_crops()
    spec = ColorAugmentSpec(blur_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ours = color_augment(crops, spec, torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    reference = T.Compose([T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2)])
    theirs = torch.stack([reference(c.float() / 255) for c in crops])

    def stats(x):
        luma = 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        return luma.mean((1, 2)), luma.std(dim=(1, 2)), (x.amax(1) - x.amin(1)).mean((1, 2))

    for name, a, b in zip(("brightness", "contrast", "saturation"), stats(ours), stats(theirs)):
        assert ks_distance(a, b) < 0.062, name
    untouched = stats(crops.float() / 255)[0]
    assert ks_distance(stats(ours)[0], untouched) > 0.062  # the check can tell jitter from none


def test_per_sample_and_batched_agree_on_odd_shapes(cpu_backend):
    """Non-square views, blur radii cut by the image size, grayscale then blur, solarize."""
    images = torch.randint(0, 256, (24, 3, 9, 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    spec = ColorAugmentSpec(grayscale_p=0.5, blur_p=0.8, solarize_p=0.5)
    per_sample = color_augment(images, spec, torch.Generator().manual_seed(9), method="per_sample")
    batched = color_augment(images, spec, torch.Generator().manual_seed(9), method="batched")
    assert (per_sample - batched).abs().max().item() < 1e-4


def test_color_augment_probabilities_and_determinism(cpu_backend):
    images = (torch.rand(400, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    spec = ColorAugmentSpec(jitter_p=0.0, grayscale_p=0.25, blur_p=0.0, solarize_p=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    out = color_augment(images, spec, torch.Generator().manual_seed(0))
    gray = (out[:, 0] == out[:, 1]).all(-1).all(-1) & (out[:, 1] == out[:, 2]).all(-1).all(-1)
    assert 70 < int(gray.sum()) < 130
    untouched = ~gray
    assert torch.allclose(out[untouched], images[untouched].float() / 255)
    again = color_augment(images, spec, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_channels_last_batches_are_accepted(cpu_backend):
    crops = _photo_crops(4, 16)
    channels_last = crops.contiguous(memory_format=torch.channels_last)
    spec = ColorAugmentSpec()
    a = color_augment(crops, spec, torch.Generator().manual_seed(2))
    b = color_augment(channels_last, spec, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["per_sample", "batched"])
def test_solarize_inverts_bright_pixels(cpu_backend, method):
    images = torch.tensor([[[[0, 100, 200, 255]]] * 3], dtype=torch.uint8)  # (1, 3, 1, 4)
    spec = ColorAugmentSpec(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    out = color_augment(images, spec, torch.Generator().manual_seed(0), method=method)[0, 0, 0]
    expected = torch.tensor([0, 100, 255 - 200, 0]) / 255
    assert torch.allclose(out, expected, atol=1e-6)


def test_color_augment_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        color_augment(torch.rand(2, 3, 4, 4), ColorAugmentSpec(), torch.Generator())
    with pytest.raises(ValueError, match="method"):
        color_augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ColorAugmentSpec(), torch.Generator(), method="gpu")
    with pytest.raises(ValueError, match="probability"):
        ColorAugmentSpec(blur_p=1.5)


@pytest.mark.parametrize("shift", [-0.5, -0.2, -1e-4, 0.13, 0.5])
def test_per_sample_hue_equals_torchvision_on_grays_and_ties(shift):
    """The CPU hue shift (mask products, ramps) on pixels that stress the sextant choice: gray
    (chroma 0), red = green max, green = blue max, all three equal, saturated primaries."""
    from data_pipeline.color_cpu import _hue_np

    x = torch.rand(3, 24, 32, generator=torch.Generator().manual_seed(5))
    x[:, 0] = 0.5  # gray
    x[1, 1] = x[0, 1]  # red and green tie
    x[2, 2] = x[1, 2]  # green and blue tie
    x[:, 3] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)
    x[:, 4] = torch.tensor([0.0, 1.0, 1.0]).view(3, 1)
    ours = x.numpy() * 255.0
    _hue_np(ours, shift)
    expected = TF.adjust_hue(x, shift) * 255.0
    assert np.abs(ours - expected.numpy()).max() <= 2e-3


@pytest.mark.parametrize("shift", [-0.5, -0.2, -1e-4, 0.13, 0.5])
def test_cpu_hue_equals_torchvision_on_grays_and_ties(cpu_backend, shift):
    """The whole CPU path with only a hue shift on uint8 pixels with gray, tied and primary colours."""
    x = torch.randint(0, 256, (1, 3, 24, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    x[0, :, 0] = 128  # gray
    x[0, 1, 1] = x[0, 0, 1]  # red and green tie
    x[0, 2, 2] = x[0, 1, 2]  # green and blue tie
    x[0, :, 3] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1)
    x[0, :, 4] = torch.tensor([0, 255, 255], dtype=torch.uint8).view(3, 1)
    x[0, :, 5] = torch.tensor([200, 200, 10], dtype=torch.uint8).view(3, 1)
    off = torch.zeros(1, dtype=torch.bool)
    params = ColorParams(jitter=torch.ones(1, dtype=torch.bool), factors=torch.tensor([[1.0, 1.0, 1.0, shift]]),
                         order=torch.tensor([[3, 0, 1, 2]]), gray=off, blur=off, sigma=torch.ones(1), solarize=off)
    spec = ColorAugmentSpec(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ours = color_cpu.apply_per_sample(x, spec, params)[0]
    expected = TF.adjust_hue(x[0].float() / 255, shift)
    assert (ours - expected).abs().max().item() <= 4e-6


def test_cpu_path_falls_back_to_numpy_when_the_kernels_do_not_load(monkeypatch):
    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    spec = ColorAugmentSpec()
    monkeypatch.setattr(color_cpu, "BACKEND", "numpy")
    expected = color_augment(images, spec, torch.Generator().manual_seed(3))
    monkeypatch.setattr(color_cpu, "BACKEND", "numba")
    monkeypatch.delattr(data_pipeline, "color_jit", raising=False)
    monkeypatch.setitem(sys.modules, "data_pipeline.color_jit", None)  # importing it now fails
    with pytest.warns(UserWarning, match="fused color kernels do not load"):
        got = color_augment(images, spec, torch.Generator().manual_seed(3))
    assert color_cpu.BACKEND == "numpy" and torch.equal(got, expected)
