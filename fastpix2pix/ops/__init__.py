"""The ops of pix2pix's hot blocks: fused conv-BatchNorm-activation, the PatchGAN loss and the L1 term.

- :mod:`~fastpix2pix.ops.reference`: every op in plain PyTorch (the independent reference and fallback);
- :mod:`~fastpix2pix.ops.kernels`: the compiled ``torch.ops.fastpix2pix`` ops, their fake kernels (for
  ``torch.compile`` and ``FakeTensorMode``) and autograd;
- :mod:`~fastpix2pix.ops.selfcheck`: the start-up check of the kernels against the reference;
- :mod:`~fastpix2pix.ops.fused`: the public fused ops, the kernels where the check passed, else the reference;
- :mod:`~fastpix2pix.ops.backend`: the choice between them; :mod:`~fastpix2pix.ops.sync_bn`: synchronised
  BatchNorm for data-parallel training; :mod:`~fastpix2pix.ops.running_stats`: BatchNorm's running-statistic
  update, at once or batched over a training iteration (:func:`deferred_running_stats`).

Importing this package registers the fake kernels and autograd whenever the compiled library is present.
"""

from fastpix2pix._extension import BUILD_INFO, cuda_kernels_available, extension_available
from fastpix2pix.ops import reference
from fastpix2pix.ops.backend import BACKENDS, default_backend, get_backend
from fastpix2pix.ops.running_stats import deferred_running_stats
from fastpix2pix.ops.selfcheck import KernelCheckWarning, OpCheck, set_self_check, verify_kernels
from fastpix2pix.ops.sync_bn import SyncBatchNorm2d

if extension_available():
    # Registers the fake kernels and autograd of torch.ops.fastpix2pix (it raises without the library).
    from fastpix2pix.ops import fused  # noqa: F401

__all__ = [
    "BACKENDS",
    "BUILD_INFO",
    "KernelCheckWarning",
    "OpCheck",
    "SyncBatchNorm2d",
    "cuda_kernels_available",
    "default_backend",
    "deferred_running_stats",
    "extension_available",
    "get_backend",
    "reference",
    "set_self_check",
    "verify_kernels",
]
