"""Image and segmentation quality metrics, batched in torch (CPU or GPU).

Image metrics take ``(N, C, H, W)`` (or ``(C, H, W)``) float tensors and return one value per image,
shape ``(N,)``. ``data_range`` is the width of the value range (as scikit-image's): 1.0 for images in [0, 1],
255.0 for 8-bit values, 2.0 for the networks' [-1, 1]. L1 and PSNR depend only on differences, so with
the matching ``data_range`` they read the same for any of these ranges. SSIM is scale- but not
shift-invariant (its luminance term compares means), so compute it on images in [0, 1] (or 0..255):
map [-1, 1] tensors with ``(x + 1) / 2`` first, as ``fastpix2pix eval`` does.

* :func:`l1_error` = mean |a - b| / data_range: the mean absolute error as a fraction of full scale,
  i.e. in [0, 1] units. The pix2pix training loss |G(A) - B| (before lambda_L1) is computed in
  [-1, 1] units and is therefore exactly 2x this value.
* :func:`psnr` = 10 log10(data_range^2 / MSE), MSE over all pixels and channels of an image (as
  scikit-image's ``peak_signal_noise_ratio``). Identical images give +inf.
* :func:`ssim` = SSIM of Wang et al. 2004: 11x11 Gaussian window (sigma 1.5, normalised), K1 = 0.01,
  K2 = 0.03, population (not sample) covariances, statistics only where the window fits inside the image
  ("valid"), mean over the SSIM map, then over channels. This equals scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=..., channel_axis=...)``, which also discards the 5-pixel border.

Segmentation scores follow the FCN-score of pix2pix (its ``scripts/eval_cityscapes``): one confusion
matrix accumulated over the whole test set (not a mean of per-image scores), then

* per-pixel accuracy = trace / total;
* per-class accuracy of class k = TP_k / (ground-truth pixels of k);
* class IoU of class k = TP_k / (ground-truth pixels of k + predicted pixels of k - TP_k);
* mean class accuracy and mean IoU average over the classes that occur in the ground truth *or* the
  prediction. A class absent from both is undefined (NaN) and left out. A class predicted but absent
  from the ground truth scores 0 (accuracy 0/0 is counted as 0, as the official code's 1e-12 epsilon
  does), so false alarms of a missing class lower both means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_SIGMA",
    "SSIM_WINDOW",
    "SegmentationScores",
    "confusion_matrix",
    "gaussian_window",
    "l1_error",
    "psnr",
    "segmentation_scores",
    "ssim",
]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# --- image metrics ----------------------------------------------------------------------------------


def _as_batch(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and make both ``(N, C, H, W)`` floating tensors (float64 stays float64)."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() == 3:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) or (C, H, W) images, got {tuple(a.shape)}")
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.to(dtype), b.to(dtype)


def l1_error(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean absolute error per image, as a fraction of ``data_range`` (so in [0, 1] units)."""
    a, b = _as_batch(prediction, target)
    return (a - b).abs().mean(dim=(1, 2, 3)) / data_range


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB: 10 log10(data_range^2 / MSE); +inf if identical."""
    a, b = _as_batch(prediction, target)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(
    size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``size`` taps (odd), as scipy's ``gaussian_filter`` builds it."""
    if size % 2 != 1:
        raise ValueError(f"window size must be odd, got {size}")
    x = torch.arange(size, dtype=torch.float64) - size // 2
    window = torch.exp(-0.5 * (x / sigma) ** 2)
    return (window / window.sum()).to(dtype)


def _filter_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of ``(N, C, H, W)`` per channel, keeping only fully covered pixels."""
    channels = x.shape[1]
    horizontal = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    return F.conv2d(F.conv2d(x, horizontal, groups=channels), vertical, groups=channels)


def ssim(
    prediction: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    *,
    window_size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """Mean SSIM per image (Gaussian window, averaged over channels); see the module docstring."""
    a, b = _as_batch(prediction, target)
    if min(a.shape[-2:]) < window_size:
        raise ValueError(
            f"SSIM needs images of at least {window_size}x{window_size}, got {tuple(a.shape[-2:])}"
        )
    # Centring on the target's mean changes no statistic but keeps E[x^2] - E[x]^2 from cancelling
    # catastrophically in float32.
    offset = b.mean(dim=(1, 2, 3), keepdim=True)
    a, b = a - offset, b - offset
    window = gaussian_window(window_size, sigma, a.dtype).to(a.device)
    stats = _filter_valid(torch.cat([a, b, a * a, b * b, a * b], dim=1), window)
    mu_a, mu_b, aa, bb, ab = stats.chunk(5, dim=1)
    var_a = aa - mu_a * mu_a
    var_b = bb - mu_b * mu_b
    cov = ab - mu_a * mu_b
    # With the offset removed the means are shifted, so the luminance term uses the shifted-back means.
    mu_a, mu_b = mu_a + offset, mu_b + offset
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    luminance = (2 * mu_a * mu_b + c1) / (mu_a * mu_a + mu_b * mu_b + c1)
    structure = (2 * cov + c2) / (var_a + var_b + c2)
    return (luminance * structure).mean(dim=(1, 2, 3))


# --- segmentation scores ----------------------------------------------------------------------------


def confusion_matrix(
    target: torch.Tensor, prediction: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """``(K, K)`` int64 counts: row = ground-truth class, column = predicted class.

    Pixels whose target is ``ignore_index`` or outside ``0..K-1`` are not counted; a prediction outside
    that range is an error (it would silently vanish otherwise).
    """
    if target.shape != prediction.shape:
        raise ValueError(f"target {tuple(target.shape)} and prediction {tuple(prediction.shape)} differ")
    target = target.reshape(-1).long()
    prediction = prediction.reshape(-1).long().to(target.device)
    if prediction.numel() and (prediction.min() < 0 or prediction.max() >= num_classes):
        raise ValueError(f"predictions must be class indices in 0..{num_classes - 1}")
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    codes = target[keep] * num_classes + prediction[keep]
    return torch.bincount(codes, minlength=num_classes * num_classes).view(num_classes, num_classes)


@dataclass(frozen=True)
class SegmentationScores:
    """FCN-score style results (see the module docstring); per-class lists hold NaN for absent classes."""

    pixel_accuracy: float
    mean_class_accuracy: float
    mean_iou: float
    class_accuracy: list[float]
    class_iou: list[float]
    pixels: int

    def as_dict(self, class_names: tuple[str, ...] | None = None) -> dict[str, object]:
        """JSON-ready dict; NaN becomes None, per-class values keyed by name if ``class_names``."""
        names = class_names or tuple(str(k) for k in range(len(self.class_accuracy)))

        def per_class(values: list[float]) -> dict[str, float | None]:
            return {name: _json_float(v) for name, v in zip(names, values, strict=True)}

        return {
            "pixel_accuracy": _json_float(self.pixel_accuracy),
            "mean_class_accuracy": _json_float(self.mean_class_accuracy),
            "mean_iou": _json_float(self.mean_iou),
            "class_accuracy": per_class(self.class_accuracy),
            "class_iou": per_class(self.class_iou),
            "pixels": self.pixels,
        }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def segmentation_scores(confusion: torch.Tensor) -> SegmentationScores:
    """Per-pixel accuracy, mean per-class accuracy and mean IoU of a ``(K, K)`` confusion matrix."""
    cm = confusion.double().cpu()
    true_positive = cm.diagonal()
    in_target = cm.sum(dim=1)
    in_prediction = cm.sum(dim=0)
    union = in_target + in_prediction - true_positive
    present = union > 0  # in the ground truth or the prediction
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    # 0/0 accuracy of a class that is predicted but absent from the ground truth counts as 0.
    class_accuracy = torch.where(present, true_positive / in_target.clamp_min(1), nan)
    class_iou = torch.where(present, true_positive / union.clamp_min(1), nan)
    total = float(cm.sum())
    return SegmentationScores(
        pixel_accuracy=float(true_positive.sum()) / total if total else float("nan"),
        mean_class_accuracy=float(class_accuracy[present].mean()) if present.any() else float("nan"),
        mean_iou=float(class_iou[present].mean()) if present.any() else float("nan"),
        class_accuracy=class_accuracy.tolist(),
        class_iou=class_iou.tolist(),
        pixels=int(total),
    )
