// Convolution blocks: the convolution math is ATen's (oneDNN on CPU, cuDNN on GPU); everything after
// it goes through the fused per-device ops. This file is device-generic and registered for every
// backend the library was built for.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"

namespace fastpix2pix {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using TensorPair = std::tuple<Tensor, Tensor>;

// Typed handles to the per-device ops, looked up once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

TensorPair bn_stats(const Tensor& x, int64_t groups) {
  static auto op = op_handle<TensorPair(const Tensor&, int64_t)>("fastpix2pix::bn_stats");
  return op.call(x, groups);
}

Tensor bn_act_forward(const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                      const OptTensor& bias, double eps, double slope, int64_t groups) {
  static auto op = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                    const OptTensor&, double, double, int64_t)>("fastpix2pix::bn_act_forward");
  return op.call(x, mean, var, weight, bias, eps, slope, groups);
}

TensorPair bn_act_backward_reduce(const Tensor& grad_out, const Tensor& x, const Tensor& mean,
                                  const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                                  double eps, double slope, int64_t groups) {
  static auto op =
      op_handle<TensorPair(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                           const OptTensor&, double, double, int64_t)>("fastpix2pix::bn_act_backward_reduce");
  return op.call(grad_out, x, mean, var, weight, bias, eps, slope, groups);
}

Tensor bn_act_backward_apply(const Tensor& grad_out, const Tensor& x, const Tensor& mean, const Tensor& var,
                             const OptTensor& weight, const OptTensor& bias, const Tensor& sum_dz,
                             const Tensor& sum_dz_xhat, int64_t count, double eps, double slope,
                             bool training, int64_t groups) {
  static auto op = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, int64_t,
                                    double, double, bool, int64_t)>("fastpix2pix::bn_act_backward_apply");
  return op.call(grad_out, x, mean, var, weight, bias, sum_dz, sum_dz_xhat, count, eps, slope, training,
                 groups);
}

Tensor bias_act_forward(const Tensor& x, const OptTensor& bias, double slope) {
  static auto op = op_handle<Tensor(const Tensor&, const OptTensor&, double)>("fastpix2pix::bias_act_forward");
  return op.call(x, bias, slope);
}

TensorPair bias_act_backward(const Tensor& grad_out, const Tensor& out, double slope, bool need_bias_grad) {
  static auto op =
      op_handle<TensorPair(const Tensor&, const Tensor&, double, bool)>("fastpix2pix::bias_act_backward");
  return op.call(grad_out, out, slope, need_bias_grad);
}

void check_conv_args(const Tensor& x, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef output_padding, const char* op) {
  check_4d(x, op, "x");
  check_4d(weight, op, "weight");
  check_floating(x, op, "x");
  check_same_device(x, weight, op, "weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " differs from input dtype ", x.scalar_type());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && output_padding.size() == 2, op,
              ": stride, padding and output_padding must have 2 elements each");
}

const std::vector<int64_t> kNoDilation = {1, 1};

Tensor convolve(const Tensor& x, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef output_padding, bool transposed) {
  return at::convolution(x, weight, std::nullopt, stride, padding, kNoDilation, transposed, output_padding,
                         /*groups=*/1);
}

std::tuple<Tensor, Tensor> convolve_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                             at::IntArrayRef output_padding, bool transposed, bool need_grad_x,
                                             bool need_grad_weight) {
  if (!need_grad_x && !need_grad_weight) {
    return {};
  }
  auto grads = at::convolution_backward(grad_y, x, weight, std::nullopt, stride, padding, kNoDilation,
                                        transposed, output_padding, /*groups=*/1,
                                        {need_grad_x, need_grad_weight, false});
  return {std::get<0>(grads), std::get<1>(grads)};
}

// How many groups the statistics of a block have: its groups in training; one in eval, where the running
// statistics normalise every group alike.
int64_t stats_groups(bool training, int64_t groups) { return training ? groups : 1; }

// A group-major per-channel vector summed over its groups (itself for one group).
Tensor over_groups(const Tensor& t, int64_t groups) { return groups == 1 ? t : t.view({groups, -1}).sum(0); }

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bn_act(const Tensor& x, const Tensor& weight,
                                                       const OptTensor& bn_weight, const OptTensor& bn_bias,
                                                       const OptTensor& running_mean,
                                                       const OptTensor& running_var, at::IntArrayRef stride,
                                                       at::IntArrayRef padding, at::IntArrayRef output_padding,
                                                       bool transposed, bool training, double eps,
                                                       double slope, int64_t groups) {
  constexpr const char* op = "fastpix2pix::conv_bn_act";
  check_conv_args(x, weight, stride, padding, output_padding, op);
  check_groups(x, groups, op);  // before the convolution's work
  Tensor conv_out = convolve(x, weight, stride, padding, output_padding, transposed);
  Tensor mean, var;
  if (training) {
    std::tie(mean, var) = bn_stats(conv_out, groups);
  } else {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value() && running_mean->defined() &&
                    running_var->defined(),
                op, ": eval mode (training=False) needs running_mean and running_var");
    const int64_t channels = conv_out.size(1);
    check_channel_vector(conv_out, *running_mean, channels, op, "running_mean");
    check_channel_vector(conv_out, *running_var, channels, op, "running_var");
    // Copies, never aliases: a custom op's outputs must not alias its inputs.
    mean = running_mean->to(stats_dtype(conv_out), /*non_blocking=*/false, /*copy=*/true);
    var = running_var->to(stats_dtype(conv_out), /*non_blocking=*/false, /*copy=*/true);
  }
  Tensor out = bn_act_forward(conv_out, mean, var, bn_weight, bn_bias, eps, slope, stats_groups(training, groups));
  return {out, conv_out, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bn_act_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& conv_out,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const Tensor& mean, const Tensor& var,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed,
    bool training, double eps, double slope, std::array<bool, 4> output_mask, int64_t groups) {
  constexpr const char* op = "fastpix2pix::conv_bn_act_backward";
  check_conv_args(x, weight, stride, padding, output_padding, op);
  check_groups(x, groups, op);
  const int64_t stats = stats_groups(training, groups);
  const bool need_grad_y = output_mask[0] || output_mask[1];
  // A gradient in another memory order than conv_out (a channel slice of a concatenation's gradient, or an
  // NCHW gradient of a channels_last block) is copied once here, not once in each of the two passes below.
  // A gradient the passes would refuse (shape, dtype) goes to them as it is, for their error.
  const Tensor grad = grad_out.defined() && grad_out.sizes() == conv_out.sizes() &&
                              grad_out.scalar_type() == conv_out.scalar_type() &&
                              grad_out.device() == conv_out.device()
                          ? in_memory_order_of(grad_out, conv_out)
                          : grad_out;
  // The sums are needed for the affine grads, and in training for grad_y too.
  Tensor sum_dz, sum_dz_xhat;
  if (output_mask[2] || output_mask[3] || (need_grad_y && training)) {
    std::tie(sum_dz, sum_dz_xhat) =
        bn_act_backward_reduce(grad, conv_out, mean, var, bn_weight, bn_bias, eps, slope, stats);
  }
  Tensor grad_x, grad_weight;
  if (need_grad_y) {
    const int64_t count = conv_out.numel() / (conv_out.size(1) * stats);  // values per channel and group
    Tensor grad_y = bn_act_backward_apply(grad, conv_out, mean, var, bn_weight, bn_bias, sum_dz, sum_dz_xhat,
                                          count, eps, slope, training, stats);
    std::tie(grad_x, grad_weight) = convolve_backward(grad_y, x, weight, stride, padding, output_padding,
                                                      transposed, output_mask[0], output_mask[1]);
  }
  // One weight and bias normalise every group: their gradients are the groups' sums added.
  Tensor grad_bn_weight = output_mask[2] ? over_groups(sum_dz_xhat, stats).to(bn_weight->scalar_type()) : Tensor();
  Tensor grad_bn_bias = output_mask[3] ? over_groups(sum_dz, stats).to(bn_bias->scalar_type()) : Tensor();
  return {grad_x, grad_weight, grad_bn_weight, grad_bn_bias};
}

Tensor conv_bias_act(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed, double slope) {
  check_conv_args(x, weight, stride, padding, output_padding, "fastpix2pix::conv_bias_act");
  Tensor conv_out = convolve(x, weight, stride, padding, output_padding, transposed);
  const bool has_bias = bias.has_value() && bias->defined();
  if (!has_bias && slope == 1.0) {
    return conv_out;  // nothing to fuse: identity epilogue
  }
  return bias_act_forward(conv_out, bias, slope);
}

std::tuple<Tensor, Tensor, Tensor> conv_bias_act_backward(const Tensor& grad_out, const Tensor& x,
                                                          const Tensor& weight, const Tensor& out,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef output_padding, bool transposed,
                                                          double slope, std::array<bool, 3> output_mask) {
  check_conv_args(x, weight, stride, padding, output_padding, "fastpix2pix::conv_bias_act_backward");
  Tensor grad_y = grad_out;
  Tensor grad_bias;
  if (slope != 1.0 || output_mask[2]) {
    std::tie(grad_y, grad_bias) = bias_act_backward(grad_out, out, slope, output_mask[2]);
  }
  auto [grad_x, grad_weight] = convolve_backward(grad_y, x, weight, stride, padding, output_padding, transposed,
                                                 output_mask[0], output_mask[1]);
  return {grad_x, grad_weight, grad_bias};
}

void register_blocks(torch::Library& m) {
  m.impl("conv_bn_act", &conv_bn_act);
  m.impl("conv_bn_act_backward", &conv_bn_act_backward);
  m.impl("conv_bias_act", &conv_bias_act);
  m.impl("conv_bias_act_backward", &conv_bias_act_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpix2pix, CPU, m) { register_blocks(m); }

#ifdef FASTPIX2PIX_WITH_CUDA
TORCH_LIBRARY_IMPL(fastpix2pix, CUDA, m) { register_blocks(m); }
#endif

}  // namespace fastpix2pix
