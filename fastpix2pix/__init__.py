"""fastpix2pix: pix2pix image-to-image translation with fused C++/CUDA ops for PyTorch."""

from importlib.metadata import PackageNotFoundError, version

from fastpix2pix._extension import BUILD_INFO, cuda_kernels_available, extension_available
from fastpix2pix.backend import BACKENDS, default_backend, get_backend

try:
    __version__ = version("fastpix2pix")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BACKENDS",
    "BUILD_INFO",
    "__version__",
    "cuda_kernels_available",
    "default_backend",
    "extension_available",
    "get_backend",
]
