"""Scoring translated images: L1, PSNR, SSIM and the facade FCN-score (a parser trained on the labels)."""

from fastpix2pix.evaluation.evaluate import (
    evaluate_parser,
    evaluate_results,
    find_result_images,
    format_report,
)
from fastpix2pix.evaluation.metrics import confusion_matrix, l1_error, psnr, segmentation_scores, ssim

__all__ = [
    "confusion_matrix",
    "evaluate_parser",
    "evaluate_results",
    "find_result_images",
    "format_report",
    "l1_error",
    "psnr",
    "segmentation_scores",
    "ssim",
]
