"""Multi-crop: crop boxes as RandomResizedCrop draws them, uint8 views, and the batched colour
stage against torchvision's per-image ops."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from data_pipeline.augment import (
    ColorAugmentSpec,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_augment,
    gaussian_blur,
)
from data_pipeline.crops import CropSpec, MultiCrop, min_decode_side, sample_crop_box


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
def test_batched_colour_ops_equal_torchvision_per_image(ours, theirs, low, high):
    x = _images()
    factors = torch.linspace(low, high, x.shape[0])
    batched = ours(x.clone(), factors)
    for i in range(x.shape[0]):
        expected = theirs(x[i], float(factors[i]))
        assert (batched[i] - expected).abs().max().item() <= 2e-5


def test_blur_equals_torchvision_gaussian_blur():
    x = _images(3, 32)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    out = gaussian_blur(x, sigma, max_sigma=2.0)
    for i in range(3):
        expected = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[float(sigma[i])] * 2)
        assert (out[i] - expected).abs().max().item() <= 1e-5


def test_color_augment_probabilities_and_determinism():
    images = (torch.rand(400, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    spec = ColorAugmentSpec(jitter_p=0.0, grayscale_p=0.25, blur_p=0.0, solarize_p=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    out = color_augment(images, spec, torch.Generator().manual_seed(0))
    gray = (out[:, 0] == out[:, 1]).all(-1).all(-1) & (out[:, 1] == out[:, 2]).all(-1).all(-1)
    assert 70 < int(gray.sum()) < 130
    untouched = ~gray
    assert torch.allclose(out[untouched], images[untouched].float() / 255)
    again = color_augment(images, spec, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_solarize_inverts_bright_pixels():
    images = torch.tensor([[[[0, 100, 200, 255]]] * 3], dtype=torch.uint8)  # (1, 3, 1, 4)
    spec = ColorAugmentSpec(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    out = color_augment(images, spec, torch.Generator().manual_seed(0))[0, 0, 0]
    expected = torch.tensor([0, 100, 255 - 200, 0]) / 255
    assert torch.allclose(out, expected, atol=1e-6)


def test_color_augment_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        color_augment(torch.rand(2, 3, 4, 4), ColorAugmentSpec(), torch.Generator())
