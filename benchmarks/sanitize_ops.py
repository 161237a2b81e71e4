"""Every fused CUDA kernel once, for compute-sanitizer (memcheck, racecheck): no cuDNN, no timing.

Calls the low-level ops of ``torch.ops.fastpix2pix`` directly (the conv blocks only add cuDNN, whose own
kernels the sanitizer would spend minutes on) in float32 and bfloat16, NCHW and channels_last, at a
single-block and at multi-block sizes (the reductions' second level), including a size that is not a
multiple of the vector width (the scalar tail). Run as

    compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize_ops.py

The sanitizer reports errors; this script also fails (exit 1) if a result is not finite.
"""

from __future__ import annotations

import sys

import torch

import fastpix2pix  # noqa: F401  (loads the library)

lib = torch.ops.fastpix2pix
SHAPES = [(1, 8, 4, 4), (4, 64, 33, 31), (16, 64, 64, 64)]
SLOPES = (0.0, 0.2, 1.0)


def run_all(device: torch.device) -> list[torch.Tensor]:
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            for channels_last in (False, True):
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                grad = torch.randn_like(x)
                channels = shape[1]
                weight = torch.rand(channels, device=device) + 0.5
                bias = torch.randn(channels, device=device)
                mean, var = lib.bn_stats(x)
                for slope in SLOPES:
                    out = lib.bn_act_forward(x, mean, var, weight, bias, 1e-5, slope)
                    sum_dz, sum_dz_xhat = lib.bn_act_backward_reduce(
                        grad, x, mean, var, weight, bias, 1e-5, slope
                    )
                    count = x.numel() // channels
                    grad_x = lib.bn_act_backward_apply(
                        grad, x, mean, var, weight, bias, sum_dz, sum_dz_xhat, count, 1e-5, slope, True
                    )
                    biased = lib.bias_act_forward(x, bias.to(dtype), slope)
                    grad_b, grad_bias = lib.bias_act_backward(grad, biased, slope, True)
                    results += [mean, var, out, sum_dz, sum_dz_xhat, grad_x, biased, grad_b, grad_bias]
                for mode in ("vanilla", "lsgan"):
                    for real in (True, False):
                        results += [t for t in lib.gan_loss(x, real, mode, True) if t is not None]
                results += [t for t in lib.l1_loss(x, grad, 100.0, True) if t is not None]
    torch.cuda.synchronize(device)
    return results


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_ops: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    results = run_all(torch.device("cuda"))
    bad = sum(not bool(torch.isfinite(t.float()).all()) for t in results)
    print(f"sanitize_ops: {len(results)} results, {bad} not finite")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
