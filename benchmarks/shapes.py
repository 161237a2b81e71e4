"""The layer shapes of pix2pix's networks, computed from the model definition rules.

One place for the benchmarks (``bench_ops.py``, and the whole-step benchmarks to come) to get every
convolution block of ``unet_256`` (encoder e1..e8, decoder d1..d7 and the output d8) and of the basic 70x70
PatchGAN (C64, C128, C256, C512 and the output), with what follows each convolution: BatchNorm or a bias,
and the activation. The rules are those of :mod:`fastpix2pix.models` (and of the official code):

- U-Net: level k has ngf * min(2**k, 8) channels, 4x4 stride-2 convs; the outermost and innermost
  encoder levels have no norm; every encoder level but the innermost ends in LeakyReLU(0.2), the innermost
  in ReLU; decoder levels are transposed convs + BatchNorm + ReLU reading [skip, up] (twice the width)
  except the innermost; the output is a transposed conv with a bias and no activation (tanh follows).
- PatchGAN: n_layers stride-2 4x4 convs then a stride-1 one, widths ndf * min(2**n, 8); the first conv
  has a bias and no norm; the output conv has a bias, one channel, no activation.
- Under BatchNorm, a conv has no bias (the norm's shift replaces it), also where the norm is left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

RELU = 0.0
LEAKY_RELU = 0.2
IDENTITY = 1.0


@dataclass(frozen=True)
class LayerShape:
    """One convolution block: conv (or transposed conv) -> BatchNorm or bias or nothing -> LeakyReLU."""

    net: str  # "unet_256" or "patchgan"
    name: str  # e1..e8, d1..d8; C64, C128, C256, C512, out
    in_channels: int
    out_channels: int
    in_size: int  # square inputs
    out_size: int
    kernel: int
    stride: int
    padding: int
    transposed: bool
    batch_norm: bool
    bias: bool
    negative_slope: float

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.in_channels, self.in_size, self.in_size)

    def output_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.out_channels, self.out_size, self.out_size)

    def weight_shape(self) -> tuple[int, int, int, int]:
        if self.transposed:
            return (self.in_channels, self.out_channels, self.kernel, self.kernel)
        return (self.out_channels, self.in_channels, self.kernel, self.kernel)

    def conv_kwargs(self) -> dict:
        """Keyword arguments of fastpix2pix's conv_bn_act / conv_bias_act (reference and fused alike)."""
        return {
            "stride": (self.stride, self.stride),
            "padding": (self.padding, self.padding),
            "transposed": self.transposed,
            "negative_slope": self.negative_slope,
        }

    def flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the convolution's forward pass."""
        spatial = (self.in_size if self.transposed else self.out_size) ** 2
        return 2 * batch * spatial * self.in_channels * self.out_channels * self.kernel**2

    def as_dict(self) -> dict:
        return asdict(self)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _conv_transpose_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size - 1) * stride - 2 * padding + kernel


def unet_layers(
    input_nc: int = 3, output_nc: int = 3, ngf: int = 64, num_downs: int = 8, size: int = 256
) -> list[LayerShape]:
    """The blocks of UnetGenerator(num_downs) at size x size inputs, in execution order: e1..eN, d1..dN."""
    if size % 2**num_downs:
        raise ValueError(f"unet with {num_downs} downs needs a size divisible by {2**num_downs}, got {size}")
    widths = [ngf * min(2**level, 8) for level in range(num_downs)]
    innermost = num_downs - 1
    layers = []
    in_size = size
    for level, (c_in, c_out) in enumerate(zip([input_nc, *widths[:-1]], widths, strict=True)):
        out_size = _conv_out(in_size, 4, 2, 1)
        edge = level in (0, innermost)
        slope = RELU if level == innermost else LEAKY_RELU
        layers.append(
            LayerShape(
                "unet_256" if num_downs == 8 else f"unet_{size}",
                f"e{level + 1}",
                c_in,
                c_out,
                in_size,
                out_size,
                4,
                2,
                1,
                False,
                not edge,
                False,
                slope,
            )
        )
        in_size = out_size
    for j, level in enumerate(range(innermost, 0, -1)):
        c_in = widths[level] if level == innermost else 2 * widths[level]
        out_size = _conv_transpose_out(in_size, 4, 2, 1)
        layers.append(
            LayerShape(
                layers[0].net,
                f"d{j + 1}",
                c_in,
                widths[level - 1],
                in_size,
                out_size,
                4,
                2,
                1,
                True,
                True,
                False,
                RELU,
            )
        )
        in_size = out_size
    out_size = _conv_transpose_out(in_size, 4, 2, 1)
    layers.append(
        LayerShape(
            layers[0].net,
            f"d{num_downs}",
            2 * widths[0],
            output_nc,
            in_size,
            out_size,
            4,
            2,
            1,
            True,
            False,
            True,
            IDENTITY,
        )
    )
    return layers


def patchgan_layers(input_nc: int = 6, ndf: int = 64, n_layers: int = 3, size: int = 256) -> list[LayerShape]:
    """The blocks of NLayerDiscriminator(n_layers) on a size x size (A, B) pair: C64 ... out."""
    widths = [ndf * min(2**n, 8) for n in range(n_layers + 1)]
    layers = []
    in_size = size
    out_size = _conv_out(in_size, 4, 2, 1)
    layers.append(
        LayerShape(
            "patchgan",
            f"C{widths[0]}",
            input_nc,
            widths[0],
            in_size,
            out_size,
            4,
            2,
            1,
            False,
            False,
            True,
            LEAKY_RELU,
        )
    )
    in_size = out_size
    for n in range(1, n_layers + 1):
        stride = 2 if n < n_layers else 1
        out_size = _conv_out(in_size, 4, stride, 1)
        layers.append(
            LayerShape(
                "patchgan",
                f"C{widths[n]}",
                widths[n - 1],
                widths[n],
                in_size,
                out_size,
                4,
                stride,
                1,
                False,
                True,
                False,
                LEAKY_RELU,
            )
        )
        in_size = out_size
    out_size = _conv_out(in_size, 4, 1, 1)
    layers.append(
        LayerShape("patchgan", "out", widths[-1], 1, in_size, out_size, 4, 1, 1, False, False, True, IDENTITY)
    )
    return layers


def pix2pix_layers(size: int = 256) -> list[LayerShape]:
    """unet_256 then the basic PatchGAN, the default pix2pix pair (3-channel images, ngf = ndf = 64)."""
    return unet_layers(size=size) + patchgan_layers(size=size)


def patchgan_output_shape(batch: int, size: int = 256) -> tuple[int, int, int, int]:
    """The logits map the GAN loss reads."""
    return patchgan_layers(size=size)[-1].output_shape(batch)


def image_shape(batch: int, channels: int = 3, size: int = 256) -> tuple[int, int, int, int]:
    """What the L1 loss reads: the generator's output and the target image."""
    return (batch, channels, size, size)


if __name__ == "__main__":
    for layer in pix2pix_layers():
        print(layer)
