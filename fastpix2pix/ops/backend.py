"""Choosing between the fused ops and the plain-PyTorch reference.

Both modules expose the same functions with the same signatures (see :mod:`fastpix2pix.ops.reference`),
so a model holds one of them and calls it.
"""

from __future__ import annotations

from types import ModuleType

from fastpix2pix._extension import extension_available
from fastpix2pix.ops import reference

__all__ = ["BACKENDS", "default_backend", "get_backend"]

BACKENDS = ("fused", "reference")


def default_backend() -> str:
    """ "fused" when the compiled library is loaded, else "reference"."""
    return "fused" if extension_available() else "reference"


def get_backend(name: str | None = None) -> ModuleType:
    """The ops module for a backend name (None: the default)."""
    name = default_backend() if name is None else name
    if name == "reference":
        return reference
    if name == "fused":
        if not extension_available():
            raise RuntimeError(
                "backend 'fused' needs the compiled library fastpix2pix._C, which is not built; "
                "build it (`make build`) or choose backend 'reference'"
            )
        from fastpix2pix.ops import fused as ops

        return ops
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
