// CPU kernels of the fused BatchNorm + activation ops and the bias + activation ops (schemas and semantics
// in fastpix2pix.cpp). Each op makes the fewest passes over memory its math allows: statistics one read,
// normalise + activate one read and one write, the backward's reduction two reads, its apply pass two
// reads and one write. All of them walk the strips of cpu_kernel_utils.h, NCHW or channels_last.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/cpu_kernel_utils.h"

namespace fastpix2pix::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// --- statistics ----------------------------------------------------------------------------------------

// Merges a strip's moments (n_b values per channel, mean_b, m2_b: the sum of squared deviations) into the
// running ones of `channels` consecutive channels with n values each so far (Chan, Golub & LeVeque).
template <typename acc>
inline void merge_moments(double* mean, double* m2, int64_t n, const acc* mean_b, const acc* m2_b,
                          int64_t n_b, int64_t channels) {
  const double fraction = double(n_b) / double(n + n_b);
  const double weight = double(n) * fraction;
  for (int64_t c = 0; c < channels; ++c) {
    const double delta = double(mean_b[c]) - mean[c];
    mean[c] += delta * fraction;
    m2[c] += double(m2_b[c]) + delta * delta * weight;
  }
}

// One value of each channel (its first), the origin its moments are taken from.
template <typename scalar_t>
ChannelArray<acc_t<scalar_t>> first_values(const Tensor& x, Layout layout) {
  const int64_t channels = x.size(1);
  const int64_t channel_stride = layout == Layout::kChannelsLast ? 1 : x.size(2) * x.size(3);
  ChannelArray<acc_t<scalar_t>> values(channels);
  if (x.numel() > 0) {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) {
      values[c] = static_cast<acc_t<scalar_t>>(data[c * channel_stride]);
    }
  }
  return values;
}

// Each strip's per-channel moments of x - origin (origin: one of each channel's own values, so that the
// subtraction is near exact and leaves numbers of the size of the spread: neither the sums nor the merges
// lose precision when the mean is large against the spread). Two passes per strip: its mean, then the
// squared deviations from that mean; the second pass reads the strip from cache.
template <typename scalar_t>
void strip_moments(const StripPlan<AccVec<scalar_t>>& plan, const scalar_t* data,
                   const ChannelArray<acc_t<scalar_t>>& origin, std::vector<acc_t<scalar_t>>& strip_mean,
                   std::vector<acc_t<scalar_t>>& strip_m2) {
  using Vec = AccVec<scalar_t>;
  using acc = acc_t<scalar_t>;
  const int64_t slots = plan.slots();
  parallel_for_strips(plan, [&](int64_t task, const Strip& s) {
    acc* mean = strip_mean.data() + task * slots;
    const auto shifted = [&](int64_t i, int64_t w, auto ch) {
      return load(data + i, w) - lanes<Vec>(ch, origin.data());
    };
    const auto value = [&](int64_t i, int64_t w, auto ch) { return std::array<Vec, 1>{shifted(i, w, ch)}; };
    plan.template sum<1>(s, value, {mean});
    for (int64_t k = 0; k < slots; ++k) {
      mean[k] /= acc(s.length);
    }
    const auto squared_deviation = [&](int64_t i, int64_t w, auto ch) {
      const Vec d = shifted(i, w, ch) - strip_lanes<Vec>(ch, mean);
      return std::array<Vec, 1>{d * d};
    };
    plan.template sum<1>(s, squared_deviation, {strip_m2.data() + task * slots});
  });
}

// Per-channel mean and biased variance: the strips' moments merged per channel in a fixed order (results do
// not depend on timing) and in double (float's rounding would add up over the many strips of a large batch).
template <typename scalar_t>
std::tuple<Tensor, Tensor> bn_stats_kernel(const Tensor& x, Layout layout) {
  using acc = acc_t<scalar_t>;
  const StripPlan<AccVec<scalar_t>> plan(layout, x);
  const int64_t slots = plan.slots();
  const ChannelArray<acc> origin = first_values<scalar_t>(x, layout);
  std::vector<acc> strip_mean(plan.tasks() * slots), strip_m2(plan.tasks() * slots);
  strip_moments<scalar_t>(plan, x.const_data_ptr<scalar_t>(), origin, strip_mean, strip_m2);

  const int64_t channels = x.size(1);
  ChannelArray<double> mean(channels), m2(channels);
  std::vector<int64_t> count(channels);
  for (int64_t task = 0; task < plan.tasks(); ++task) {
    const Strip s = plan.strip(task);
    const int64_t first = s.channel,
                  covered = s.broadcast ? 1 : channels;  // channels_last: all, equal counts
    merge_moments(mean.data() + first, m2.data() + first, count[first], strip_mean.data() + task * slots,
                  strip_m2.data() + task * slots, s.length, covered);
    std::for_each(count.begin() + first, count.begin() + first + covered, [&](int64_t& n) { n += s.length; });
  }
  // Every channel has N*H*W values; with none (an empty batch) the statistics are NaN, as torch.var_mean's.
  const int64_t values = x.numel() / std::max<int64_t>(channels, 1);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  ChannelArray<double> var(channels);
  for (int64_t c = 0; c < channels; ++c) {
    mean[c] = values > 0 ? origin[c] + mean[c] : nan;
    var[c] = values > 0 ? m2[c] / double(values) : nan;
  }
  const auto options = x.options().dtype(stats_dtype(x));
  return {mean.to_tensor(options), var.to_tensor(options)};
}

// --- normalise + activate, and its backward --------------------------------------------------------------

// The per-channel constants of z = (x - mean) * scale + bias, scale = weight * invstd (weight None: 1,
// bias None: 0). x - mean comes first so that a large mean cancels exactly before any rounding.
template <typename acc>
struct Normalization {
  ChannelArray<acc> mean, invstd, scale, bias;

  Normalization(const Tensor& mean_t, const Tensor& var_t, const OptTensor& weight, const OptTensor& bias_t,
                double eps)
      : mean(mean_t, mean_t.numel(), acc(0)),
        invstd(var_t, var_t.numel(), acc(0)),
        scale(weight.value_or(Tensor()), mean_t.numel(), acc(1)),
        bias(bias_t.value_or(Tensor()), mean_t.numel(), acc(0)) {
    for (int64_t c = 0; c < mean.size(); ++c) {
      invstd[c] = acc(1) / std::sqrt(invstd[c] + static_cast<acc>(eps));
      scale[c] *= invstd[c];
    }
  }

  // x - mean, and z (the activation's input), for a vector of x holding `channels`.
  template <typename Vec, typename Channels>
  std::pair<Vec, Vec> centered_and_z(const Vec& x, Channels channels) const {
    const Vec centered = x - lanes<Vec>(channels, mean.data());
    return {centered, centered * lanes<Vec>(channels, scale.data()) + lanes<Vec>(channels, bias.data())};
  }
};

template <typename scalar_t>
void bn_act_forward_kernel(const Tensor& x, const Tensor& out, Layout layout,
                           const Normalization<acc_t<scalar_t>>& norm, double negative_slope) {
  using Vec = AccVec<scalar_t>;
  const StripPlan<Vec> plan(layout, x);
  const Activation<Vec> act(negative_slope);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* result = out.mutable_data_ptr<scalar_t>();
  parallel_for_strips(plan, [&](int64_t, const Strip& s) {
    plan.for_each_vector(s, [&](int64_t i, int64_t w, auto ch) {
      store(result + i, act(norm.centered_and_z(load(in + i, w), ch).second), w);
    });
  });
}

// Per channel, sum(dz) and sum(dz * (x - mean)), dz = grad_out * act'(z): the backward's reduction.
template <typename scalar_t>
std::array<ChannelArray<double>, 2> bn_act_backward_sums(const Tensor& grad_out, const Tensor& x,
                                                         Layout layout,
                                                         const Normalization<acc_t<scalar_t>>& norm,
                                                         double negative_slope) {
  using Vec = AccVec<scalar_t>;
  const StripPlan<Vec> plan(layout, x);
  const Activation<Vec> act(negative_slope);
  const scalar_t* grad = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  return sum_per_channel<2>(plan, [&](int64_t i, int64_t w, auto ch) {
    const auto [centered, z] = norm.centered_and_z(load(in + i, w), ch);
    const Vec dz = act.grad(load(grad + i, w), z);
    return std::array<Vec, 2>{dz, dz * centered};
  });
}

// The batch statistics' own gradient, per channel: mean_dz = sum_dz / count and centered_coef = invstd *
// sum_dz_xhat / count.
template <typename acc>
struct StatsGradient {
  ChannelArray<acc> mean_dz, centered_coef;
};

// grad_x = scale * (dz - mean_dz - (x - mean) * centered_coef) in training, scale * dz in eval (no
// `stats_grad`). Eval has no correction at all rather than a zero one: (x - mean) * 0 is NaN at a NaN x,
// where PyTorch's eval gradient is finite.
template <typename scalar_t>
void bn_act_backward_apply_kernel(const Tensor& grad_out, const Tensor& x, const Tensor& grad_x,
                                  Layout layout, const Normalization<acc_t<scalar_t>>& norm,
                                  const std::optional<StatsGradient<acc_t<scalar_t>>>& stats_grad,
                                  double negative_slope) {
  using Vec = AccVec<scalar_t>;
  const StripPlan<Vec> plan(layout, x);
  const Activation<Vec> act(negative_slope);
  const scalar_t* grad = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* result = grad_x.mutable_data_ptr<scalar_t>();
  parallel_for_strips(plan, [&](int64_t, const Strip& s) {
    plan.for_each_vector(s, [&](int64_t i, int64_t w, auto ch) {
      const auto [centered, z] = norm.centered_and_z(load(in + i, w), ch);
      Vec grad_z = act.grad(load(grad + i, w), z);
      if (stats_grad) {
        grad_z = grad_z - (lanes<Vec>(ch, stats_grad->mean_dz.data()) +
                           centered * lanes<Vec>(ch, stats_grad->centered_coef.data()));
      }
      store(result + i, lanes<Vec>(ch, norm.scale.data()) * grad_z, w);
    });
  });
}

// --- bias + activation ---------------------------------------------------------------------------------

template <typename scalar_t>
void bias_act_forward_kernel(const Tensor& x, const Tensor& out, Layout layout,
                             const ChannelArray<acc_t<scalar_t>>& bias, double negative_slope) {
  using Vec = AccVec<scalar_t>;
  const StripPlan<Vec> plan(layout, x);
  const Activation<Vec> act(negative_slope);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* result = out.mutable_data_ptr<scalar_t>();
  parallel_for_strips(plan, [&](int64_t, const Strip& s) {
    plan.for_each_vector(s, [&](int64_t i, int64_t w, auto ch) {
      store(result + i, act(load(in + i, w) + lanes<Vec>(ch, bias.data())), w);
    });
  });
}

// grad_x = grad_out * act'(out), written while its per-channel sum (the bias gradient) is taken.
template <typename scalar_t>
ChannelArray<double> bias_act_backward_kernel(const Tensor& grad_out, const Tensor& out, const Tensor& grad_x,
                                              Layout layout, double negative_slope) {
  using Vec = AccVec<scalar_t>;
  const StripPlan<Vec> plan(layout, out);
  const Activation<Vec> act(negative_slope);
  const scalar_t* grad = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* forward_out = out.const_data_ptr<scalar_t>();
  scalar_t* result = grad_x.mutable_data_ptr<scalar_t>();
  return sum_per_channel<1>(plan, [&](int64_t i, int64_t w, auto) {
    const Vec dz = act.grad(load(grad + i, w), load(forward_out + i, w));
    store(result + i, dz, w);
    return std::array<Vec, 1>{dz};
  })[0];
}

// --- the ops: validation, layouts, dtype dispatch ------------------------------------------------------

// Per group of the batch (check_groups), the group's [C] results of `per_group(g)` concatenated group-major: a
// grouped BatchNorm is `groups` BatchNorms of the groups' batches, each walking a view of x.
template <typename PerGroup>
std::vector<Tensor> by_group(int64_t groups, const PerGroup& per_group) {
  std::vector<Tensor> first, second;
  for (int64_t g = 0; g < groups; ++g) {
    auto [a, b] = per_group(g);
    first.push_back(std::move(a));
    second.push_back(std::move(b));
  }
  if (groups == 1) {
    return {first[0], second[0]};
  }
  return {at::cat(first), at::cat(second)};
}

std::tuple<Tensor, Tensor> bn_stats(const Tensor& x, int64_t groups) {
  constexpr const char* op = "fastpix2pix::bn_stats";
  check_4d(x, op, "x");
  check_floating(x, op, "x");
  check_groups(x, groups, op);
  check_values_per_channel(x, op, groups);
  const Layout layout = walk_layout(x);
  const Tensor input = in_layout(x, layout);
  const auto stats = by_group(groups, [&](int64_t g) {
    std::tuple<Tensor, Tensor> group_stats;
    FASTPIX2PIX_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
      group_stats = bn_stats_kernel<scalar_t>(batch_group(input, groups, g), layout);
    });
    return group_stats;
  });
  return {stats[0], stats[1]};
}

Tensor bn_act_forward(const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                      const OptTensor& bias, double eps, double negative_slope, int64_t groups) {
  constexpr const char* op = "fastpix2pix::bn_act_forward";
  check_bn_args(x, mean, var, weight, bias, op, groups);
  const OutputLike out(x);
  const Tensor input = in_layout(x, out.layout);
  const int64_t channels = x.size(1);
  FASTPIX2PIX_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
    for (int64_t g = 0; g < groups; ++g) {
      const Normalization<acc_t<scalar_t>> norm(stats_group(mean, channels, g), stats_group(var, channels, g),
                                                weight, bias, eps);
      bn_act_forward_kernel<scalar_t>(batch_group(input, groups, g), batch_group(out.buffer, groups, g),
                                      out.layout, norm, negative_slope);
    }
  });
  return out.finish();
}

std::tuple<Tensor, Tensor> bn_act_backward_reduce(const Tensor& grad_out, const Tensor& x, const Tensor& mean,
                                                  const Tensor& var, const OptTensor& weight,
                                                  const OptTensor& bias, double eps, double negative_slope,
                                                  int64_t groups) {
  constexpr const char* op = "fastpix2pix::bn_act_backward_reduce";
  check_bn_args(x, mean, var, weight, bias, op, groups);
  check_grad_out(x, grad_out, op);
  const Layout layout = walk_layout(x);
  const Tensor input = in_layout(x, layout);
  const Tensor grad = in_layout(grad_out, layout);
  const int64_t channels = x.size(1);
  const auto sums = by_group(groups, [&](int64_t g) {
    std::tuple<Tensor, Tensor> group_sums;
    FASTPIX2PIX_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
      const Normalization<acc_t<scalar_t>> norm(stats_group(mean, channels, g), stats_group(var, channels, g),
                                                weight, bias, eps);
      const Tensor group_input = batch_group(input, groups, g);
      auto [sum_dz, sum_dz_centered] = bn_act_backward_sums<scalar_t>(
          batch_group(grad, groups, g), group_input, layout, norm, negative_slope);
      if (group_input.numel() > 0) {  // an empty batch's sums are 0, whatever its (NaN) statistics
        for (int64_t c = 0; c < sum_dz_centered.size(); ++c) {
          sum_dz_centered[c] *= norm.invstd[c];  // sum(dz * xhat)
        }
      }
      const auto options = x.options().dtype(stats_dtype(x));
      group_sums = {sum_dz.to_tensor(options), sum_dz_centered.to_tensor(options)};
    });
    return group_sums;
  });
  return {sums[0], sums[1]};
}

Tensor bn_act_backward_apply(const Tensor& grad_out, const Tensor& x, const Tensor& mean, const Tensor& var,
                             const OptTensor& weight, const OptTensor& bias, const Tensor& sum_dz,
                             const Tensor& sum_dz_xhat, int64_t count, double eps, double negative_slope,
                             bool training, int64_t groups) {
  constexpr const char* op = "fastpix2pix::bn_act_backward_apply";
  check_bn_args(x, mean, var, weight, bias, op, groups);
  check_grad_out(x, grad_out, op);
  const int64_t channels = x.size(1);
  if (training) {  // eval reads neither the sums nor the count (they may be undefined there)
    TORCH_CHECK(sum_dz.defined() && sum_dz_xhat.defined(), op,
                ": training needs sum_dz and sum_dz_xhat (from bn_act_backward_reduce)");
    check_channel_vector(x, sum_dz, groups * channels, op, "sum_dz");
    check_channel_vector(x, sum_dz_xhat, groups * channels, op, "sum_dz_xhat");
    TORCH_CHECK(count > 0 || x.numel() == 0, op, ": count must be positive in training, got ", count);
  }
  const OutputLike grad_x(x);
  const Tensor input = in_layout(x, grad_x.layout);
  const Tensor grad = in_layout(grad_out, grad_x.layout);
  FASTPIX2PIX_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
    using acc = acc_t<scalar_t>;
    for (int64_t g = 0; g < groups; ++g) {
      const Normalization<acc> norm(stats_group(mean, channels, g), stats_group(var, channels, g), weight, bias,
                                    eps);
      std::optional<StatsGradient<acc>> stats_grad;
      if (training) {
        stats_grad = StatsGradient<acc>{ChannelArray<acc>(stats_group(sum_dz, channels, g), channels, acc(0)),
                                        ChannelArray<acc>(stats_group(sum_dz_xhat, channels, g), channels, acc(0))};
        for (int64_t c = 0; c < channels; ++c) {
          stats_grad->mean_dz[c] /= acc(count);
          stats_grad->centered_coef[c] *= norm.invstd[c] / acc(count);
        }
      }
      bn_act_backward_apply_kernel<scalar_t>(batch_group(grad, groups, g), batch_group(input, groups, g),
                                             batch_group(grad_x.buffer, groups, g), grad_x.layout, norm,
                                             stats_grad, negative_slope);
    }
  });
  return grad_x.finish();
}

Tensor bias_act_forward(const Tensor& x, const OptTensor& bias, double negative_slope) {
  constexpr const char* op = "fastpix2pix::bias_act_forward";
  check_4d(x, op, "x");
  check_floating(x, op, "x");
  check_optional_channel_vector(x, bias, x.size(1), op, "bias");
  const OutputLike out(x);
  const Tensor input = in_layout(x, out.layout);
  FASTPIX2PIX_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
    const ChannelArray<acc_t<scalar_t>> b(bias.value_or(Tensor()), x.size(1), acc_t<scalar_t>(0));
    bias_act_forward_kernel<scalar_t>(input, out.buffer, out.layout, b, negative_slope);
  });
  return out.finish();
}

std::tuple<Tensor, Tensor> bias_act_backward(const Tensor& grad_out, const Tensor& out, double negative_slope,
                                             bool need_bias_grad) {
  constexpr const char* op = "fastpix2pix::bias_act_backward";
  check_4d(out, op, "out");
  check_floating(out, op, "out");
  check_grad_out(out, grad_out, op);
  // act'(z) is read off the sign of out = act(z), which is the sign of z only for a non-negative slope.
  TORCH_CHECK(negative_slope >= 0, op,
              ": negative_slope must be >= 0 (act' is read off the output's sign), got ", negative_slope);
  const OutputLike grad_x(out);
  const Tensor forward_out = in_layout(out, grad_x.layout);
  const Tensor grad = in_layout(grad_out, grad_x.layout);
  Tensor grad_bias;
  FASTPIX2PIX_DISPATCH_FLOATING(out.scalar_type(), op, [&] {
    const auto sum_dz =
        bias_act_backward_kernel<scalar_t>(grad, forward_out, grad_x.buffer, grad_x.layout, negative_slope);
    if (need_bias_grad) {
      grad_bias = sum_dz.to_tensor(out.options().dtype(stats_dtype(out)));
    }
  });
  return {grad_x.finish(), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpix2pix, CPU, m) {
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_act_forward", &bn_act_forward);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce);
  m.impl("bn_act_backward_apply", &bn_act_backward_apply);
  m.impl("bias_act_forward", &bias_act_forward);
  m.impl("bias_act_backward", &bias_act_backward);
}

}  // namespace fastpix2pix::cpu
