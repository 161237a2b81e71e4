// CPU kernels of the U-Net skip connection, relu_cat and its backward (schemas in fastpix2pix.cpp). Each
// half of the output is one ATen loop over a channel slice (relu is clamp_min(0) in ATen, and its
// gradient threshold_backward), written in place: no intermediate relu(skip) and no separate
// concatenation, and the backward hands both gradients on dense (the next BatchNorm backward reads them
// without a copy). On a GPU the point is one launch instead of two or three (cuda/concat.cu).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace fastpix2pix::cpu {
namespace {

using at::Tensor;

Tensor relu_cat(const Tensor& skip_in, const Tensor& x_in) {
  constexpr const char* op = "fastpix2pix::relu_cat";
  check_relu_cat_args(skip_in, x_in, op);
  const Layout layout = layout_of(x_in);
  const int64_t skip_channels = skip_in.size(1), x_channels = x_in.size(1);
  Tensor out = empty_in_layout({x_in.size(0), skip_channels + x_channels, x_in.size(2), x_in.size(3)},
                               x_in.options(), layout);
  Tensor first = out.narrow(1, 0, skip_channels);
  at::clamp_min_out(first, skip_in, 0);
  out.narrow(1, skip_channels, x_channels).copy_(x_in);
  return out;
}

std::tuple<Tensor, Tensor> relu_cat_backward(const Tensor& grad_out, const Tensor& skip) {
  constexpr const char* op = "fastpix2pix::relu_cat_backward";
  check_relu_cat_backward_args(grad_out, skip, op);
  const Layout layout = layout_of(grad_out);
  const int64_t skip_channels = skip.size(1), x_channels = grad_out.size(1) - skip_channels;
  const auto sizes = [&](int64_t channels) {
    return std::vector<int64_t>{grad_out.size(0), channels, grad_out.size(2), grad_out.size(3)};
  };
  Tensor grad_skip = empty_in_layout(sizes(skip_channels), grad_out.options(), layout);
  at::threshold_backward_out(grad_skip, grad_out.narrow(1, 0, skip_channels), skip, 0);
  Tensor grad_x = empty_in_layout(sizes(x_channels), grad_out.options(), layout);
  grad_x.copy_(grad_out.narrow(1, skip_channels, x_channels));
  return {grad_skip, grad_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpix2pix, CPU, m) {
  m.impl("relu_cat", &relu_cat);
  m.impl("relu_cat_backward", &relu_cat_backward);
}

}  // namespace fastpix2pix::cpu
