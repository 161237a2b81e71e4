// CUDA kernels of the fused BatchNorm + activation ops (schemas and exact semantics: fastpix2pix.cpp).
//
// Each op is a "pass" run by the generic walks of walk.cuh: bn_stats and bn_act_backward_reduce are
// per-channel reductions (Welford statistics; the two sums of the backward), bn_act_forward and
// bn_act_backward_apply elementwise maps with per-channel parameters. All arithmetic is in the
// accumulation type (float, or double for double inputs), in registers; inputs and outputs keep their dtype.
// z = (x - mean) * (weight * invstd) + bias is computed the same way in all four passes, so the backward
// takes the activation's derivative on the same z the forward activated.

#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/walk.cuh"

namespace fastpix2pix::gpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The per-channel vectors of a BatchNorm, in the statistics dtype and contiguous; weight and bias may be
// null (1 and 0). Read-only and small: they stay in L1/L2 for the whole kernel.
template <typename acc_t>
struct BnChannels {
  const acc_t* mean;
  const acc_t* var;
  const acc_t* weight;
  const acc_t* bias;
  acc_t eps;

  __device__ acc_t invstd(int64_t c) const { return acc_t(1) / device_sqrt(var[c] + eps); }
  __device__ acc_t weight_at(int64_t c) const { return weight != nullptr ? weight[c] : acc_t(1); }
  __device__ acc_t bias_at(int64_t c) const { return bias != nullptr ? bias[c] : acc_t(0); }
};

// --- bn_stats: Welford mean and m2 per channel ----------------------------------------------------------

template <typename acc_t>
struct StatsFinalizer {
  acc_t* mean;
  acc_t* var;
  acc_t inv_count;  // 1 / (values per channel), exact from the host: var is the biased variance

  __device__ void operator()(int64_t c, const typename Welford<acc_t>::Lane& lane) const {
    mean[c] = lane.v[Welford<acc_t>::kMean];
    var[c] = lane.v[Welford<acc_t>::kM2] * inv_count;
  }
};

template <typename scalar_t, int kVec>
struct BnStatsPass {
  static constexpr int kV = kVec;
  using acc_t = acc_type<scalar_t>;
  using Accumulator = WelfordAccumulator<acc_t, kV>;
  using Reducer = typename Accumulator::Reducer;
  struct Params {};

  const scalar_t* x;
  StatsFinalizer<acc_t> finalize;

  template <bool kLanesAreChannels>
  __device__ Params params(int64_t) const {
    return {};
  }
  __device__ Vec<scalar_t, kV> load(int64_t offset) const { return load_vec<kV>(x, offset); }
  __device__ void accumulate(Accumulator& acc, const Params&, const Vec<scalar_t, kV>& in, int64_t) const {
    acc_t value[kV];
    to_acc(in, value);
    acc.add(value);
  }
};

// --- bn_act_forward ---------------------------------------------------------------------------------------

template <typename acc_t, int kV>
struct AffineParams {  // z = (x - mean) * scale + bias, per lane
  acc_t mean[kV];
  acc_t scale[kV];
  acc_t bias[kV];
};

template <bool kLanesAreChannels, int kV, typename acc_t>
__device__ AffineParams<acc_t, kV> affine_params(const BnChannels<acc_t>& bn, int64_t channel0) {
  AffineParams<acc_t, kV> p;
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    const int64_t c = lane_channel<kLanesAreChannels>(channel0, i);
    p.mean[i] = bn.mean[c];
    p.scale[i] = bn.weight_at(c) * bn.invstd(c);
    p.bias[i] = bn.bias_at(c);
  }
  return p;
}

template <typename scalar_t, int kVec>
struct BnForwardPass {
  static constexpr int kV = kVec;
  using acc_t = acc_type<scalar_t>;
  using Params = AffineParams<acc_t, kV>;

  const scalar_t* x;
  scalar_t* out;
  BnChannels<acc_t> bn;
  acc_t slope;

  template <bool kLanesAreChannels>
  __device__ Params params(int64_t channel0) const {
    return affine_params<kLanesAreChannels, kV>(bn, channel0);
  }
  __device__ Vec<scalar_t, kV> load(int64_t offset) const { return load_vec<kV>(x, offset); }
  __device__ void apply(const Params& p, const Vec<scalar_t, kV>& in, int64_t offset) const {
    Vec<scalar_t, kV> result;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const acc_t z = (static_cast<acc_t>(in.val[i]) - p.mean[i]) * p.scale[i] + p.bias[i];
      result.val[i] = static_cast<scalar_t>(activate(z, slope));
    }
    store_vec<kV>(out, offset, result);
  }
};

// --- bn_act_backward_reduce: sum(dz) and sum(dz * xhat) per channel ---------------------------------------

template <typename acc_t, int kN>
struct SumsFinalizer {  // the kN sums, each into its own per-channel vector
  acc_t* out[kN];

  __device__ void operator()(int64_t c, const typename Sum<acc_t, kN>::Lane& lane) const {
#pragma unroll
    for (int f = 0; f < kN; ++f) {
      out[f][c] = lane.v[f];
    }
  }
};

template <typename acc_t, int kV>
struct ReduceParams {
  AffineParams<acc_t, kV> affine;
  acc_t invstd[kV];
};

template <typename scalar_t, int kVec>
struct BnBackwardReducePass {
  static constexpr int kV = kVec;
  using acc_t = acc_type<scalar_t>;
  using Accumulator = SumAccumulator<acc_t, kV, 2>;
  using Reducer = typename Accumulator::Reducer;
  using Params = ReduceParams<acc_t, kV>;
  using Loaded = GradAndValue<scalar_t, kV>;

  const scalar_t* grad;
  const scalar_t* x;
  BnChannels<acc_t> bn;
  acc_t slope;
  SumsFinalizer<acc_t, 2> finalize;  // sum_dz, sum_dz_xhat

  template <bool kLanesAreChannels>
  __device__ Params params(int64_t channel0) const {
    Params p;
    p.affine = affine_params<kLanesAreChannels, kV>(bn, channel0);
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      p.invstd[i] = bn.invstd(lane_channel<kLanesAreChannels>(channel0, i));
    }
    return p;
  }
  __device__ Loaded load(int64_t offset) const {
    return {load_vec<kV>(grad, offset), load_vec<kV>(x, offset)};
  }
  __device__ void accumulate(Accumulator& acc, const Params& p, const Loaded& in, int64_t) const {
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const acc_t centered = static_cast<acc_t>(in.value.val[i]) - p.affine.mean[i];
      const acc_t z = centered * p.affine.scale[i] + p.affine.bias[i];
      const acc_t dz = activation_backward(static_cast<acc_t>(in.grad.val[i]), z, slope);
      acc.sum[0][i] += dz;
      acc.sum[1][i] += dz * (centered * p.invstd[i]);
    }
  }
};

// --- bn_act_backward_apply
// ----------------------------------------------------------------------------------

template <typename acc_t, int kV>
struct ApplyParams {
  AffineParams<acc_t, kV> affine;
  // Training: grad_x = scale * dz - shift - (x - mean) * slope_x, with shift = scale * sum_dz / count and
  // slope_x = scale * invstd * sum_dz_xhat / count (the docs' formula, expanded). Unused in eval.
  acc_t shift[kV];
  acc_t slope_x[kV];
};

template <typename scalar_t, int kVec>
struct BnBackwardApplyPass {
  static constexpr int kV = kVec;
  using acc_t = acc_type<scalar_t>;
  using Params = ApplyParams<acc_t, kV>;
  using Loaded = GradAndValue<scalar_t, kV>;

  const scalar_t* grad;
  const scalar_t* x;
  scalar_t* grad_x;
  BnChannels<acc_t> bn;
  const acc_t* sum_dz;       // null in eval
  const acc_t* sum_dz_xhat;  // null in eval
  acc_t inv_count;
  acc_t slope;
  bool training;

  template <bool kLanesAreChannels>
  __device__ Params params(int64_t channel0) const {
    Params p;
    p.affine = affine_params<kLanesAreChannels, kV>(bn, channel0);
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int64_t c = lane_channel<kLanesAreChannels>(channel0, i);
      p.shift[i] = training ? p.affine.scale[i] * sum_dz[c] * inv_count : acc_t(0);
      p.slope_x[i] = training ? p.affine.scale[i] * bn.invstd(c) * sum_dz_xhat[c] * inv_count : acc_t(0);
    }
    return p;
  }
  __device__ Loaded load(int64_t offset) const {
    return {load_vec<kV>(grad, offset), load_vec<kV>(x, offset)};
  }
  __device__ void apply(const Params& p, const Loaded& in, int64_t offset) const {
    Vec<scalar_t, kV> result;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const acc_t centered = static_cast<acc_t>(in.value.val[i]) - p.affine.mean[i];
      const acc_t z = centered * p.affine.scale[i] + p.affine.bias[i];
      const acc_t dz = activation_backward(static_cast<acc_t>(in.grad.val[i]), z, slope);
      const acc_t grad_z = p.affine.scale[i] * dz;
      result.val[i] =
          static_cast<scalar_t>(training ? grad_z - (p.shift[i] + centered * p.slope_x[i]) : grad_z);
    }
    store_vec<kV>(grad_x, offset, result);
  }
};

// --- host side
// ----------------------------------------------------------------------------------------------
//
// A grouped BatchNorm is `groups` BatchNorms of the groups' batches (fastpix2pix.cpp): each op allocates its
// outputs once, then runs its single-group launch once per group on views of the group's elements
// (batch_group) and of its statistics and sums (stats_group). The batch is the outermost dimension of both
// walked layouts, so a group's view is itself NCHW or channels_last, and it starts a whole number of rows or
// planes into the tensor: its vector width is the whole tensor's. groups == 1 is one iteration, over all of x.

// The ops' names for their messages: constants, as the dtype dispatch in the per-group launches wants them.
constexpr const char* kBnStats = "fastpix2pix::bn_stats";
constexpr const char* kBnActForward = "fastpix2pix::bn_act_forward";
constexpr const char* kBnActBackwardReduce = "fastpix2pix::bn_act_backward_reduce";
constexpr const char* kBnActBackwardApply = "fastpix2pix::bn_act_backward_apply";

// A per-channel input converted to the statistics dtype (no copy when it already is, contiguous).
Tensor stats_vector(const Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

// The per-channel inputs every BatchNorm pass reads, in the statistics dtype and contiguous: mean and var of
// groups * C values (group-major), weight and bias of C values or undefined.
struct BnVectors {
  Tensor mean;
  Tensor var;
  Tensor weight;
  Tensor bias;
  double eps;

  // Group g's statistics with the weight and bias that all groups share.
  BnVectors group(int64_t channels, int64_t g) const {
    return {stats_group(mean, channels, g), stats_group(var, channels, g), weight, bias, eps};
  }

  template <typename acc_t>
  BnChannels<acc_t> channels() const {
    return {mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(), optional_data<acc_t>(weight),
            optional_data<acc_t>(bias), static_cast<acc_t>(eps)};
  }
};

BnVectors bn_vectors(const Tensor& mean, const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                     double eps, at::ScalarType dtype) {
  return {stats_vector(mean, dtype), stats_vector(var, dtype), channel_param(weight, dtype),
          channel_param(bias, dtype), eps};
}

// The BatchNorm ops' shared checks (checks.h), on the GPU.
void check_bn_inputs(const Tensor& x, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                     const OptTensor& bias, const char* op, int64_t groups) {
  check_cuda(x, op, "x");
  check_bn_args(x, mean, var, weight, bias, op, groups);
}

// bn_stats of one group: x laid out in `layout`; mean and var the group's C values of the outputs.
void launch_bn_stats(const Tensor& x, Layout layout, const Tensor& mean, const Tensor& var) {
  const Walk walk = walk_of(x, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), kBnStats, [&] {
    using acc_t = acc_type<scalar_t>;
    const StatsFinalizer<acc_t> finalize{
        mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(),
        static_cast<acc_t>(1.0 / static_cast<double>(walk.values_per_channel()))};
    with_vector_width<scalar_t>(vectorizable(walk, vector_width<scalar_t>(), {&x}), [&](auto width) {
      constexpr int kV = decltype(width)::value;
      launch_channel_reduce(BnStatsPass<scalar_t, kV>{x.const_data_ptr<scalar_t>(), finalize}, walk,
                            mean.options());
    });
  });
}

std::tuple<Tensor, Tensor> bn_stats(const Tensor& x_in, int64_t groups) {
  constexpr const char* op = kBnStats;
  check_cuda(x_in, op, "x");
  check_4d(x_in, op, "x");
  check_floating(x_in, op, "x");
  check_groups(x_in, groups, op);
  check_values_per_channel(x_in, op, groups);
  const DeviceGuard guard(x_in.device());
  const Layout layout = walk_layout(x_in);
  const Tensor x = in_layout(x_in, layout);
  const int64_t channels = x.size(1);
  const auto options = x.options().dtype(stats_dtype(x));
  Tensor mean = at::empty({groups * channels}, options);
  Tensor var = at::empty({groups * channels}, options);
  if (walk_of(x, layout).values_per_channel() == 0) {  // the statistics of nothing, as torch.var_mean's
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  for (int64_t g = 0; g < groups; ++g) {
    launch_bn_stats(batch_group(x, groups, g), layout, stats_group(mean, channels, g),
                    stats_group(var, channels, g));
  }
  return {mean, var};
}

// bn_act_forward of one group: x and out laid out in `layout`, bn the group's vectors.
void launch_bn_act_forward(const Tensor& x, const Tensor& out, Layout layout, const BnVectors& bn_in,
                           double negative_slope) {
  const Walk walk = walk_of(x, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), kBnActForward, [&] {
    using acc_t = acc_type<scalar_t>;
    const auto bn = bn_in.channels<acc_t>();
    with_vector_width<scalar_t>(vectorizable(walk, vector_width<scalar_t>(), {&x, &out}), [&](auto width) {
      constexpr int kV = decltype(width)::value;
      launch_map(BnForwardPass<scalar_t, kV>{x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), bn,
                                             static_cast<acc_t>(negative_slope)},
                 walk);
    });
  });
}

Tensor bn_act_forward(const Tensor& x_in, const Tensor& mean_in, const Tensor& var_in,
                      const OptTensor& weight_in, const OptTensor& bias_in, double eps, double negative_slope,
                      int64_t groups) {
  constexpr const char* op = kBnActForward;
  check_bn_inputs(x_in, mean_in, var_in, weight_in, bias_in, op, groups);
  const DeviceGuard guard(x_in.device());
  const OutputLike out(x_in);
  const Tensor x = in_layout(x_in, out.layout);
  const int64_t channels = x.size(1);
  const BnVectors bn = bn_vectors(mean_in, var_in, weight_in, bias_in, eps, stats_dtype(x));
  for (int64_t g = 0; g < groups; ++g) {
    launch_bn_act_forward(batch_group(x, groups, g), batch_group(out.buffer, groups, g), out.layout,
                          bn.group(channels, g), negative_slope);
  }
  return out.finish();
}

// bn_act_backward_reduce of one group: grad_out and x laid out in `layout`, bn the group's vectors, sum_dz
// and sum_dz_xhat the group's C values of the outputs.
void launch_bn_act_backward_reduce(const Tensor& grad_out, const Tensor& x, Layout layout,
                                   const BnVectors& bn_in, double negative_slope, const Tensor& sum_dz,
                                   const Tensor& sum_dz_xhat) {
  const Walk walk = walk_of(x, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), kBnActBackwardReduce, [&] {
    using acc_t = acc_type<scalar_t>;
    const auto bn = bn_in.channels<acc_t>();
    const SumsFinalizer<acc_t, 2> finalize{
        {sum_dz.mutable_data_ptr<acc_t>(), sum_dz_xhat.mutable_data_ptr<acc_t>()}};
    with_vector_width<scalar_t>(
        vectorizable(walk, vector_width<scalar_t>(), {&x, &grad_out}), [&](auto width) {
          constexpr int kV = decltype(width)::value;
          launch_channel_reduce(
              BnBackwardReducePass<scalar_t, kV>{grad_out.const_data_ptr<scalar_t>(),
                                                 x.const_data_ptr<scalar_t>(), bn,
                                                 static_cast<acc_t>(negative_slope), finalize},
              walk, sum_dz.options());
        });
  });
}

std::tuple<Tensor, Tensor> bn_act_backward_reduce(const Tensor& grad_out_in, const Tensor& x_in,
                                                  const Tensor& mean_in, const Tensor& var_in,
                                                  const OptTensor& weight_in, const OptTensor& bias_in,
                                                  double eps, double negative_slope, int64_t groups) {
  constexpr const char* op = kBnActBackwardReduce;
  check_bn_inputs(x_in, mean_in, var_in, weight_in, bias_in, op, groups);
  check_grad_out(x_in, grad_out_in, op);
  const DeviceGuard guard(x_in.device());
  const Layout layout = walk_layout(x_in);
  const Tensor x = in_layout(x_in, layout);
  const Tensor grad_out = in_layout(grad_out_in, layout);
  const int64_t channels = x.size(1);
  const auto dtype = stats_dtype(x);
  const auto options = x.options().dtype(dtype);
  const BnVectors bn = bn_vectors(mean_in, var_in, weight_in, bias_in, eps, dtype);
  Tensor sum_dz = at::empty({groups * channels}, options);
  Tensor sum_dz_xhat = at::empty({groups * channels}, options);
  if (x.numel() == 0) {  // no values: the sums are empty sums
    sum_dz.zero_();
    sum_dz_xhat.zero_();
    return {sum_dz, sum_dz_xhat};
  }
  for (int64_t g = 0; g < groups; ++g) {
    launch_bn_act_backward_reduce(batch_group(grad_out, groups, g), batch_group(x, groups, g), layout,
                                  bn.group(channels, g), negative_slope, stats_group(sum_dz, channels, g),
                                  stats_group(sum_dz_xhat, channels, g));
  }
  return {sum_dz, sum_dz_xhat};
}

// bn_act_backward_apply of one group: grad_out, x and grad_x laid out in `layout`, bn the group's vectors,
// sum_dz and sum_dz_xhat the group's C values (undefined in eval).
void launch_bn_act_backward_apply(const Tensor& grad_out, const Tensor& x, const Tensor& grad_x, Layout layout,
                                  const BnVectors& bn_in, const Tensor& sum_dz, const Tensor& sum_dz_xhat,
                                  int64_t count, double negative_slope, bool training) {
  const Walk walk = walk_of(x, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), kBnActBackwardApply, [&] {
    using acc_t = acc_type<scalar_t>;
    const auto bn = bn_in.channels<acc_t>();
    const acc_t inv_count = training ? static_cast<acc_t>(1.0 / static_cast<double>(count)) : acc_t(0);
    with_vector_width<scalar_t>(
        vectorizable(walk, vector_width<scalar_t>(), {&x, &grad_out, &grad_x}), [&](auto width) {
          constexpr int kV = decltype(width)::value;
          launch_map(
              BnBackwardApplyPass<scalar_t, kV>{
                  grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                  grad_x.mutable_data_ptr<scalar_t>(), bn, optional_data<acc_t>(sum_dz),
                  optional_data<acc_t>(sum_dz_xhat), inv_count, static_cast<acc_t>(negative_slope), training},
              walk);
        });
  });
}

Tensor bn_act_backward_apply(const Tensor& grad_out_in, const Tensor& x_in, const Tensor& mean_in,
                             const Tensor& var_in, const OptTensor& weight_in, const OptTensor& bias_in,
                             const Tensor& sum_dz_in, const Tensor& sum_dz_xhat_in, int64_t count, double eps,
                             double negative_slope, bool training, int64_t groups) {
  constexpr const char* op = kBnActBackwardApply;
  check_bn_inputs(x_in, mean_in, var_in, weight_in, bias_in, op, groups);
  check_grad_out(x_in, grad_out_in, op);
  const int64_t channels = x_in.size(1);
  if (training) {  // in eval the sums are not read (and may be undefined)
    TORCH_CHECK(sum_dz_in.defined() && sum_dz_xhat_in.defined(), op,
                ": training needs sum_dz and sum_dz_xhat (from bn_act_backward_reduce)");
    check_channel_vector(x_in, sum_dz_in, groups * channels, op, "sum_dz");
    check_channel_vector(x_in, sum_dz_xhat_in, groups * channels, op, "sum_dz_xhat");
    TORCH_CHECK(count > 0 || x_in.numel() == 0, op, ": count must be positive in training, got ", count);
  }
  const DeviceGuard guard(x_in.device());
  const OutputLike out(x_in);
  const Tensor x = in_layout(x_in, out.layout);
  const Tensor grad_out = in_layout(grad_out_in, out.layout);
  const auto dtype = stats_dtype(x);
  const BnVectors bn = bn_vectors(mean_in, var_in, weight_in, bias_in, eps, dtype);
  const Tensor sum_dz = training ? stats_vector(sum_dz_in, dtype) : Tensor();
  const Tensor sum_dz_xhat = training ? stats_vector(sum_dz_xhat_in, dtype) : Tensor();
  for (int64_t g = 0; g < groups; ++g) {
    launch_bn_act_backward_apply(batch_group(grad_out, groups, g), batch_group(x, groups, g),
                                 batch_group(out.buffer, groups, g), out.layout, bn.group(channels, g),
                                 stats_group(sum_dz, channels, g), stats_group(sum_dz_xhat, channels, g), count,
                                 negative_slope, training);
  }
  return out.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpix2pix, CUDA, m) {
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_act_forward", &bn_act_forward);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce);
  m.impl("bn_act_backward_apply", &bn_act_backward_apply);
}

}  // namespace fastpix2pix::gpu
