"""fastpix2pix: pix2pix image-to-image translation with fused C++/CUDA ops for PyTorch.

The parts, each a package with its public names in ``__all__``: :mod:`~fastpix2pix.ops` (the fused ops and
their reference), :mod:`~fastpix2pix.models`, :mod:`~fastpix2pix.data`, :mod:`~fastpix2pix.runs` (options,
checkpoints), :mod:`~fastpix2pix.training`, :mod:`~fastpix2pix.inference`, :mod:`~fastpix2pix.evaluation`,
:mod:`~fastpix2pix.serve`. Importing the package registers the ops' fake kernels and autograd, so
``torch.ops.fastpix2pix.*`` works under ``torch.compile`` and ``FakeTensorMode`` whenever the compiled
library is present.
"""

from fastpix2pix import ops
from fastpix2pix._extension import BUILD_INFO, cuda_kernels_available, extension_available
from fastpix2pix.ops.backend import BACKENDS, default_backend, get_backend
from fastpix2pix.runtime import package_version

__version__ = package_version()

__all__ = [
    "BACKENDS",
    "BUILD_INFO",
    "__version__",
    "cuda_kernels_available",
    "default_backend",
    "extension_available",
    "get_backend",
    "ops",
]
