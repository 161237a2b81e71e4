"""Loads the compiled operator library ``fastpix2pix._C`` and its build record.

A missing library is not an error: the package runs on the reference ops and says so once. A library
built against another torch is an error, because it would crash or misbehave at the first op call.
"""

from __future__ import annotations

import importlib
import json
import warnings
from types import ModuleType
from typing import Any

import torch

REBUILD_HINT = "rebuild it: `make build`, or `pip install --no-build-isolation -e .` in the source tree"


def _import_library() -> ModuleType | None:
    try:
        # By its full name: the library is a leaf, and this module must not import the package face.
        library = importlib.import_module("fastpix2pix._C")
    except ModuleNotFoundError:
        return None
    except (ImportError, OSError) as error:  # typically undefined symbols from another torch ABI
        raise ImportError(
            f"fastpix2pix._C failed to load ({error}); it was probably built against another torch "
            f"than the installed {torch.__version__}: {REBUILD_HINT}"
        ) from error
    return library


def _check_torch_version(info: dict[str, Any]) -> None:
    if info.get("torch") != torch.__version__:
        raise ImportError(
            f"fastpix2pix._C was built against torch {info.get('torch')} but torch {torch.__version__} "
            f"is installed: {REBUILD_HINT}"
        )


_library = _import_library()
BUILD_INFO: dict[str, Any] = json.loads(_library.BUILD_INFO) if _library is not None else {}
if _library is None:
    warnings.warn(
        "fastpix2pix._C is not built: running on the plain-PyTorch reference ops (slower). "
        f"To get the fused kernels, {REBUILD_HINT}",
        stacklevel=2,
    )
else:
    _check_torch_version(BUILD_INFO)


def extension_available() -> bool:
    """Whether the compiled operator library is loaded (its ops are in ``torch.ops.fastpix2pix``)."""
    return _library is not None


def cuda_kernels_available() -> bool:
    """Whether the library was built with its CUDA kernels."""
    return bool(BUILD_INFO.get("cuda"))
