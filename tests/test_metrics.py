"""Tests of the quality metrics and of label-map decoding.

Image metrics are checked against scikit-image (the reference implementations people compare with);
segmentation scores against hand-computed confusion matrices and the official pix2pix formulas; the
facades palette and decoder against the real facades label maps when the data is present.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastpix2pix.data import SYNTHETIC_PALETTE, shared_facades_root, synthetic_pair
from fastpix2pix.data.labelmaps import (
    FACADES_JET_POSITIONS,
    FACADES_PALETTE,
    colour_residual,
    decode_labels,
    flat_pixel_mask,
    jet_colour,
    labels_to_rgb,
    palette_from_images,
)
from fastpix2pix.evaluation.metrics import (
    confusion_matrix,
    gaussian_window,
    l1_error,
    psnr,
    segmentation_scores,
    ssim,
)

FACADES = shared_facades_root()
needs_facades = pytest.mark.skipif(FACADES is None, reason="facades data absent (set FASTPIX2PIX_FACADES)")


def image_pair(
    shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, ...]:
    """A smooth random image in [0, 1] and a noisy, slightly shifted copy (SSIM well inside (0, 1))."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(*shape[:-2], shape[-2] // 4 + 1, shape[-1] // 4 + 1, generator=g, dtype=torch.float64)
    flat = coarse.reshape(-1, 1, *coarse.shape[-2:])
    smooth = torch.nn.functional.interpolate(flat, size=shape[-2:], mode="bilinear", align_corners=False)
    a = smooth.reshape(shape)
    b = (0.9 * a + 0.05 + 0.08 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a.to(dtype), b.to(dtype)


def skimage_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float) -> float:
    """scikit-image's Gaussian SSIM with the Wang et al. settings, channels first."""
    skimage_metrics = pytest.importorskip("skimage.metrics")  # a dev dependency
    return skimage_metrics.structural_similarity(
        a.double().numpy(),
        b.double().numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
        channel_axis=0,
    )


# --- SSIM / PSNR / L1 -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 3, 64, 64), (2, 3, 37, 53), (2, 1, 11, 11), (1, 3, 256, 256)])
def test_ssim_matches_skimage_float64(shape: tuple[int, ...]) -> None:
    a, b = image_pair(shape, seed=sum(shape))
    ours = ssim(a, b, data_range=1.0)
    reference = torch.tensor([skimage_ssim(a[i], b[i], 1.0) for i in range(shape[0])], dtype=torch.float64)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    assert ((reference > 0.2) & (reference < 0.99)).all(), (
        "the test images should be neither equal nor unrelated"
    )


def test_ssim_matches_skimage_float32_and_other_ranges() -> None:
    a, b = image_pair((2, 3, 48, 40), seed=7)
    reference = torch.tensor([skimage_ssim(a[i], b[i], 1.0) for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(ssim(a.float(), b.float()).double(), reference, rtol=0, atol=1e-6)
    # SSIM is scale-invariant with the matching data_range...
    torch.testing.assert_close(ssim(a * 255, b * 255, data_range=255.0), reference, rtol=0, atol=1e-12)
    # ...but not shift-invariant (the luminance term): [-1, 1] images must be mapped to [0, 1] first.
    shifted = torch.tensor(
        [skimage_ssim(a[i] * 2 - 1, b[i] * 2 - 1, 2.0) for i in range(2)], dtype=torch.float64
    )
    torch.testing.assert_close(ssim(a * 2 - 1, b * 2 - 1, data_range=2.0), shifted, rtol=0, atol=1e-12)
    assert (shifted - reference).abs().min() > 1e-3
    a255, b255 = (a * 255).round(), (b * 255).round()
    reference255 = torch.tensor(
        [skimage_ssim(a255[i], b255[i], 255.0) for i in range(2)], dtype=torch.float64
    )
    torch.testing.assert_close(ssim(a255, b255, data_range=255.0), reference255, rtol=0, atol=1e-12)


def test_ssim_properties() -> None:
    a, b = image_pair((2, 3, 32, 32), seed=3)
    torch.testing.assert_close(ssim(a, a), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(ssim(a, b), ssim(b, a))
    torch.testing.assert_close(ssim(a[0], b[0]), ssim(a, b)[:1])  # (C, H, W) is a batch of one
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[..., :10, :], b[..., :10, :])
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(a, b[..., :31])


def test_gaussian_window_is_scipys() -> None:
    window = gaussian_window(11, 1.5)
    x = np.arange(-5, 6)
    expected = np.exp(-0.5 * (x / 1.5) ** 2)
    np.testing.assert_allclose(window.numpy(), expected / expected.sum(), rtol=1e-15)


def test_psnr_matches_skimage() -> None:
    a, b = image_pair((3, 3, 40, 40), seed=11)
    skimage_metrics = pytest.importorskip("skimage.metrics")
    reference = [
        skimage_metrics.peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=1.0) for i in range(3)
    ]
    torch.testing.assert_close(psnr(a, b), torch.tensor(reference, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(psnr(a * 2 - 1, b * 2 - 1, data_range=2.0), psnr(a, b))
    assert math.isinf(float(psnr(a, a)[0]))


def test_l1_is_a_fraction_of_full_scale() -> None:
    a = torch.zeros(1, 3, 2, 2)
    b = torch.full((1, 3, 2, 2), 0.25)
    assert float(l1_error(a, b)) == pytest.approx(0.25)
    # The same images in [-1, 1]: the training loss |a - b| is twice the metric.
    a2, b2 = a * 2 - 1, b * 2 - 1
    assert float((a2 - b2).abs().mean()) == pytest.approx(0.5)
    assert float(l1_error(a2, b2, data_range=2.0)) == pytest.approx(0.25)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_image_metrics_on_cuda_match_cpu() -> None:
    a, b = image_pair((4, 3, 64, 64), seed=5, dtype=torch.float32)
    for metric in (ssim, psnr, l1_error):
        torch.testing.assert_close(metric(a.cuda(), b.cuda()).cpu(), metric(a, b), rtol=1e-5, atol=1e-6)


# --- segmentation scores ----------------------------------------------------------------------------


def test_confusion_matrix_by_hand() -> None:
    target = torch.tensor([[0, 0, 0, 1], [1, 2, 2, 2]])
    prediction = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    expected = torch.tensor([[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    assert torch.equal(confusion_matrix(target, prediction, 4), expected)
    # Ignored and out-of-range targets are not counted.
    target_ignored = torch.tensor([[0, 0, 0, 1], [1, 2, 2, 255]])
    cm = confusion_matrix(target_ignored, prediction, 4, ignore_index=255)
    assert int(cm.sum()) == 7 and int(cm[2, 0]) == 0
    with pytest.raises(ValueError, match="class indices"):
        confusion_matrix(target, prediction + 3, 4)


def test_segmentation_scores_by_hand() -> None:
    # Rows = truth. Class 3 is absent from truth and prediction: excluded from the means.
    cm = torch.tensor([[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    scores = segmentation_scores(cm)
    assert scores.pixel_accuracy == pytest.approx(5 / 8)
    assert scores.class_accuracy[:3] == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert math.isnan(scores.class_accuracy[3]) and math.isnan(scores.class_iou[3])
    assert scores.mean_class_accuracy == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    # IoU = TP / (truth + predicted - TP): 2/(3+3-2), 1/(2+2-1), 2/(3+3-2).
    assert scores.class_iou[:3] == pytest.approx([1 / 2, 1 / 3, 1 / 2])
    assert scores.mean_iou == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert scores.pixels == 8


def test_a_predicted_class_absent_from_the_truth_counts_as_zero() -> None:
    scores = segmentation_scores(confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 1]), 3))
    assert scores.class_accuracy[:2] == [0.5, 0.0] and math.isnan(scores.class_accuracy[2])
    assert scores.class_iou[:2] == [0.5, 0.0]
    assert scores.mean_class_accuracy == pytest.approx(0.25) and scores.mean_iou == pytest.approx(0.25)
    as_dict = scores.as_dict(("a", "b", "c"))
    assert as_dict["class_iou"] == {"a": 0.5, "b": 0.0, "c": None}


def official_scores(hist: np.ndarray) -> tuple[float, float, float]:
    """pix2pix scripts/eval_cityscapes/util.py ``get_scores`` (all classes present here)."""
    acc = np.diag(hist).sum() / (hist.sum() + 1e-12)
    cl_acc = np.diag(hist) / (hist.sum(1) + 1e-12)
    iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist) + 1e-12)
    return acc, np.nanmean(cl_acc), np.nanmean(iu)


def test_scores_agree_with_the_official_formulas_when_every_class_is_present() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 30, 30), generator=g)
    prediction = torch.where(
        torch.rand(target.shape, generator=g) < 0.6, target, torch.randint(0, 5, target.shape, generator=g)
    )
    cm = confusion_matrix(target, prediction, 5)
    scores = segmentation_scores(cm)
    expected = official_scores(cm.numpy().astype(np.float64))
    assert (scores.pixel_accuracy, scores.mean_class_accuracy, scores.mean_iou) == pytest.approx(expected)


# --- label maps -------------------------------------------------------------------------------------


def test_facades_palette_is_the_jet_colormap() -> None:
    jet = np.round(jet_colour(FACADES_JET_POSITIONS))
    assert np.abs(jet - FACADES_PALETTE.astype(float)).max() <= 1


@pytest.mark.parametrize("palette", [FACADES_PALETTE, SYNTHETIC_PALETTE], ids=["facades", "synthetic"])
def test_decode_is_exact_on_lossless_label_maps(palette: np.ndarray) -> None:
    labels = np.stack([synthetic_pair(0, "train", i, size=64)[1] for i in range(3)]).astype(np.int64)
    rgb = labels_to_rgb(labels, palette)
    assert np.array_equal(decode_labels(rgb, palette), labels)
    decoded = decode_labels(torch.from_numpy(rgb), torch.from_numpy(palette.astype(np.int64)))
    assert isinstance(decoded, torch.Tensor) and torch.equal(decoded, torch.from_numpy(labels))
    assert np.array_equal(decode_labels(rgb[0], palette), labels[0])


def jpeg_round_trip(rgb: np.ndarray) -> np.ndarray:
    """Save as the facades files are saved (JPEG quality 95, 4:2:0) and read back."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95, subsampling=2)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_decode_survives_jpeg_better_than_rgb_distance() -> None:
    labels = np.stack([synthetic_pair(0, "train", i, size=256)[1] for i in range(4)]).astype(np.int64)
    damaged = np.stack([jpeg_round_trip(labels_to_rgb(x, FACADES_PALETTE)) for x in labels])
    ours = (decode_labels(damaged, FACADES_PALETTE) == labels).mean()
    rgb_distance = ((damaged[..., None, :].astype(float) - FACADES_PALETTE.astype(float)) ** 2).sum(-1)
    plain = (rgb_distance.argmin(-1) == labels).mean()
    assert ours > 0.985 and ours > plain + 0.03, (ours, plain)


def facades_label_halves(split: str, count: int) -> np.ndarray:
    paths = sorted((FACADES / split).glob("*.jpg"), key=lambda p: int(p.stem))[:count]
    return np.stack([np.asarray(Image.open(p).convert("RGB"))[:, 256:] for p in paths])


@needs_facades
def test_palette_from_real_facades_labels() -> None:
    halves = facades_label_halves("train", 120)
    palette, coverage = palette_from_images(halves, 12, return_coverage=True)
    # The same 12 colours as FACADES_PALETTE (any order), and nothing else of any weight.
    distance = np.abs(palette[:, None].astype(int) - FACADES_PALETTE[None].astype(int)).max(-1)
    assert sorted(distance.argmin(1).tolist()) == list(range(12))
    assert distance.min(1).max() <= 2
    assert coverage > 0.9999


@needs_facades
def test_decode_real_facades_labels() -> None:
    halves = facades_label_halves("test", 24)
    labels = decode_labels(halves, FACADES_PALETTE)
    assert labels.min() >= 0 and labels.max() <= 11
    assert len(np.unique(labels)) >= 10  # the classes are really there, not collapsed
    residual = colour_residual(halves, labels, FACADES_PALETTE)
    flat = np.stack([flat_pixel_mask(h) for h in halves])
    flat[:, :, 0] = False  # column 0 is blended with the photo across the A|B seam
    # Region interiors match their palette colour to a few levels (all 106 test images: median 1.4,
    # 99th percentile 7.3); edges are JPEG/resize blends of two classes.
    assert np.median(residual[flat]) <= 3 and np.percentile(residual[flat], 99) <= 10
    assert np.median(residual) <= 12
    # Re-drawing the decoded maps and saving them as the dataset does gives the same maps back.
    again = decode_labels(
        np.stack([jpeg_round_trip(labels_to_rgb(x, FACADES_PALETTE)) for x in labels]), FACADES_PALETTE
    )
    assert (again == labels).mean() > 0.99
