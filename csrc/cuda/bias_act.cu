// CUDA kernels of the bias + activation ops, the epilogue of the norm-free layers (schemas and exact
// semantics: fastpix2pix.cpp). With a bias (or a bias gradient) they walk the tensor channel by channel;
// without, every element is alike and the tensor is walked as a flat array in whatever dense layout it has.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/walk.cuh"

namespace fastpix2pix::gpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// out = act(x + bias[c]), channel by channel.
template <typename scalar_t, int kVec>
struct BiasActForwardPass {
  static constexpr int kV = kVec;
  using acc_t = acc_type<scalar_t>;
  struct Params {
    acc_t bias[kV];
  };

  const scalar_t* x;
  scalar_t* out;
  const acc_t* bias;
  acc_t slope;

  template <bool kLanesAreChannels>
  __device__ Params params(int64_t channel0) const {
    Params p;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      p.bias[i] = bias[lane_channel<kLanesAreChannels>(channel0, i)];
    }
    return p;
  }
  __device__ Vec<scalar_t, kV> load(int64_t offset) const { return load_vec<kV>(x, offset); }
  __device__ void apply(const Params& p, const Vec<scalar_t, kV>& in, int64_t offset) const {
    Vec<scalar_t, kV> result;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      result.val[i] = static_cast<scalar_t>(activate(static_cast<acc_t>(in.val[i]) + p.bias[i], slope));
    }
    store_vec<kV>(out, offset, result);
  }
};

// out = act(x), flat.
template <typename scalar_t, int kVec>
struct ActivationForwardPass {
  static constexpr int kV = kVec;
  using acc_t = acc_type<scalar_t>;

  const scalar_t* x;
  scalar_t* out;
  acc_t slope;

  __device__ Vec<scalar_t, kV> load(int64_t offset) const { return load_vec<kV>(x, offset); }
  __device__ void apply(const Vec<scalar_t, kV>& in, int64_t offset) const {
    Vec<scalar_t, kV> result;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      result.val[i] = static_cast<scalar_t>(activate(static_cast<acc_t>(in.val[i]), slope));
    }
    store_vec<kV>(out, offset, result);
  }
};

// grad_x = grad_out * act'(z), with act'(z) read off the forward output: out > 0 exactly when z > 0 for a
// non-negative slope. The value each pass computes at one position.
template <int kV, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t grad_z_at(const GradAndValue<scalar_t, kV>& in, int i, acc_t slope) {
  return activation_backward(static_cast<acc_t>(in.grad.val[i]), static_cast<acc_t>(in.value.val[i]), slope);
}

// grad_x alone, flat.
template <typename scalar_t, int kVec>
struct ActivationBackwardPass {
  static constexpr int kV = kVec;
  using acc_t = acc_type<scalar_t>;

  const scalar_t* grad;
  const scalar_t* out;
  scalar_t* grad_x;
  acc_t slope;

  __device__ GradAndValue<scalar_t, kV> load(int64_t offset) const {
    return {load_vec<kV>(grad, offset), load_vec<kV>(out, offset)};
  }
  __device__ void apply(const GradAndValue<scalar_t, kV>& in, int64_t offset) const {
    Vec<scalar_t, kV> result;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      result.val[i] = static_cast<scalar_t>(grad_z_at(in, i, slope));
    }
    store_vec<kV>(grad_x, offset, result);
  }
};

// The bias gradient, in the accumulation (statistics) dtype, as the fake kernel in ops/kernels.py promises.
template <typename acc_t>
struct BiasGradFinalizer {
  acc_t* grad_bias;

  __device__ void operator()(int64_t c, const typename Sum<acc_t, 1>::Lane& lane) const {
    grad_bias[c] = lane.v[0];
  }
};

// grad_x, and its per-channel sum (the bias gradient) in the same pass.
template <typename scalar_t, int kVec>
struct BiasActBackwardPass {
  static constexpr int kV = kVec;
  using acc_t = acc_type<scalar_t>;
  using Accumulator = SumAccumulator<acc_t, kV, 1>;
  using Reducer = typename Accumulator::Reducer;
  struct Params {};

  const scalar_t* grad;
  const scalar_t* out;
  scalar_t* grad_x;
  acc_t slope;
  BiasGradFinalizer<acc_t> finalize;

  template <bool kLanesAreChannels>
  __device__ Params params(int64_t) const {
    return {};
  }
  __device__ GradAndValue<scalar_t, kV> load(int64_t offset) const {
    return {load_vec<kV>(grad, offset), load_vec<kV>(out, offset)};
  }
  __device__ void accumulate(Accumulator& acc, const Params&, const GradAndValue<scalar_t, kV>& in,
                             int64_t offset) const {
    Vec<scalar_t, kV> result;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const acc_t grad_z = grad_z_at(in, i, slope);
      acc.sum[0][i] += grad_z;
      result.val[i] = static_cast<scalar_t>(grad_z);
    }
    store_vec<kV>(grad_x, offset, result);
  }
};

Tensor bias_act_forward(const Tensor& x_in, const OptTensor& bias_in, double negative_slope) {
  constexpr const char* op = "fastpix2pix::bias_act_forward";
  check_cuda(x_in, op, "x");
  check_4d(x_in, op, "x");
  check_floating(x_in, op, "x");
  check_optional_channel_vector(x_in, bias_in, x_in.size(1), op, "bias");
  const DeviceGuard guard(x_in.device());
  const Tensor bias = channel_param(bias_in, stats_dtype(x_in));
  if (!bias.defined()) {
    const Tensor out = at::empty_like(x_in);
    const Tensor x = in_memory_order_of(x_in, out);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
      using acc_t = acc_type<scalar_t>;
      with_vector_width<scalar_t>(
          flat_vectorizable(x.numel(), vector_width<scalar_t>(), {&x, &out}), [&](auto width) {
            constexpr int kV = decltype(width)::value;
            launch_flat_map(ActivationForwardPass<scalar_t, kV>{x.const_data_ptr<scalar_t>(),
                                                                out.mutable_data_ptr<scalar_t>(),
                                                                static_cast<acc_t>(negative_slope)},
                            x.numel());
          });
    });
    return out;
  }
  const OutputLike out(x_in);
  const Tensor x = in_layout(x_in, out.layout);
  const Walk walk = walk_of(x, out.layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    with_vector_width<scalar_t>(
        vectorizable(walk, vector_width<scalar_t>(), {&x, &out.buffer}), [&](auto width) {
          constexpr int kV = decltype(width)::value;
          launch_map(BiasActForwardPass<scalar_t, kV>{x.const_data_ptr<scalar_t>(),
                                                      out.buffer.mutable_data_ptr<scalar_t>(),
                                                      bias.const_data_ptr<acc_t>(),
                                                      static_cast<acc_t>(negative_slope)},
                     walk);
        });
  });
  return out.finish();
}

std::tuple<Tensor, Tensor> bias_act_backward(const Tensor& grad_out_in, const Tensor& out_in,
                                             double negative_slope, bool need_bias_grad) {
  constexpr const char* op = "fastpix2pix::bias_act_backward";
  check_cuda(out_in, op, "out");
  check_4d(out_in, op, "out");
  check_floating(out_in, op, "out");
  TORCH_CHECK(grad_out_in.defined(), op, ": grad_out is undefined");
  check_same_shape(out_in, grad_out_in, op, "grad_out");
  check_same_dtype(out_in, grad_out_in, op, "grad_out");
  TORCH_CHECK(negative_slope >= 0.0, op, ": negative_slope must be >= 0 to read the activation's derivative ",
              "off the output's sign, got ", negative_slope);
  const DeviceGuard guard(out_in.device());
  if (!need_bias_grad) {
    const Tensor grad_x = at::empty_like(out_in);
    const Tensor out = in_memory_order_of(out_in, grad_x);
    const Tensor grad_out = in_memory_order_of(grad_out_in, grad_x);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), op, [&] {
      using acc_t = acc_type<scalar_t>;
      with_vector_width<scalar_t>(
          flat_vectorizable(out.numel(), vector_width<scalar_t>(), {&out, &grad_out, &grad_x}),
          [&](auto width) {
            constexpr int kV = decltype(width)::value;
            launch_flat_map(ActivationBackwardPass<scalar_t, kV>{grad_out.const_data_ptr<scalar_t>(),
                                                                 out.const_data_ptr<scalar_t>(),
                                                                 grad_x.mutable_data_ptr<scalar_t>(),
                                                                 static_cast<acc_t>(negative_slope)},
                            out.numel());
          });
    });
    return {grad_x, Tensor()};
  }
  const OutputLike grad_x(out_in);
  const Tensor out = in_layout(out_in, grad_x.layout);
  const Tensor grad_out = in_layout(grad_out_in, grad_x.layout);
  const Walk walk = walk_of(out, grad_x.layout);
  Tensor grad_bias = at::empty({walk.channels}, out.options().dtype(stats_dtype(out)));
  if (walk.numel() == 0) {
    grad_bias.zero_();
    return {grad_x.finish(), grad_bias};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    with_vector_width<scalar_t>(
        vectorizable(walk, vector_width<scalar_t>(), {&out, &grad_out, &grad_x.buffer}), [&](auto width) {
          constexpr int kV = decltype(width)::value;
          launch_channel_reduce(BiasActBackwardPass<scalar_t, kV>{grad_out.const_data_ptr<scalar_t>(),
                                                                  out.const_data_ptr<scalar_t>(),
                                                                  grad_x.buffer.mutable_data_ptr<scalar_t>(),
                                                                  static_cast<acc_t>(negative_slope),
                                                                  {grad_bias.mutable_data_ptr<acc_t>()}},
                                walk, out.options());
        });
  });
  return {grad_x.finish(), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpix2pix, CUDA, m) {
  m.impl("bias_act_forward", &bias_act_forward);
  m.impl("bias_act_backward", &bias_act_backward);
}

}  // namespace fastpix2pix::gpu
