"""Data for pix2pix: aligned A|B datasets, single images, the data check, the synthetic facades, tools.

The augmentation is exposed as pure functions (:func:`sample_params`, :func:`apply`) so that other
implementations can be checked against it on identical random draws.
"""

from fastpix2pix.data.aligned import AlignedDataset, list_splits, split_ab, split_folder
from fastpix2pix.data.check import DataCheckError, DataLoadError, DataReport, check_dataset
from fastpix2pix.data.combine import combine_ab
from fastpix2pix.data.download import (
    OFFICIAL_DATASETS,
    OFFICIAL_URL_BASE,
    DownloadError,
    UnsafeArchiveError,
    download_dataset,
    download_file,
    safe_extract,
    shared_facades_root,
)
from fastpix2pix.data.images import (
    IMG_EXTENSIONS,
    ImageReadError,
    image_size,
    is_image_file,
    list_images,
    read_image,
    save_image,
    to_channels,
)
from fastpix2pix.data.single import INFERENCE_OPTIONS, SingleImageDataset
from fastpix2pix.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    ensure_synthetic_dataset,
    generate_synthetic_facades,
    synthetic_pair,
)
from fastpix2pix.data.transforms import (
    DIRECTIONS,
    PREPROCESS_MODES,
    AugmentParams,
    DataOptions,
    apply,
    check_size_for_generator,
    output_size,
    params_rng,
    resize_image,
    sample_params,
    to_tensor,
    transform_array,
)

__all__ = [
    "DIRECTIONS",
    "IMG_EXTENSIONS",
    "INFERENCE_OPTIONS",
    "OFFICIAL_DATASETS",
    "OFFICIAL_URL_BASE",
    "PREPROCESS_MODES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PALETTE",
    "AlignedDataset",
    "AugmentParams",
    "DataCheckError",
    "DataLoadError",
    "DataOptions",
    "DataReport",
    "DownloadError",
    "ImageReadError",
    "SingleImageDataset",
    "UnsafeArchiveError",
    "apply",
    "check_dataset",
    "check_size_for_generator",
    "combine_ab",
    "download_dataset",
    "download_file",
    "ensure_synthetic_dataset",
    "generate_synthetic_facades",
    "image_size",
    "is_image_file",
    "list_images",
    "list_splits",
    "output_size",
    "params_rng",
    "read_image",
    "resize_image",
    "safe_extract",
    "sample_params",
    "save_image",
    "shared_facades_root",
    "split_ab",
    "split_folder",
    "synthetic_pair",
    "to_channels",
    "to_tensor",
    "transform_array",
]
