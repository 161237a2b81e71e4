// CUDA kernels of the U-Net skip connection (schemas in fastpix2pix.cpp): relu_cat writes
// cat([relu(skip), x], 1) in one launch, where eager PyTorch launches a relu and a concatenation; its
// backward splits the gradient into both inputs' dense gradients in one launch, where autograd launches a
// threshold_backward and hands x a channel slice, which the BatchNorm backward after it had to copy.
//
// Every vector of kV channels (channels_last) or of kV positions of one channel's plane (NCHW) belongs to
// one of the two parts, so each thread reads one source and writes one destination: kV divides both parts'
// channel counts (channels_last) or the plane (NCHW), else kV is 1.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/walk.cuh"

namespace fastpix2pix::gpu {
namespace {

using at::Tensor;

// relu as ATen computes it (clamp_min(x, 0)): NaN stays NaN.
template <int kV, typename scalar_t>
__device__ __forceinline__ Vec<scalar_t, kV> relu_lanes(Vec<scalar_t, kV> v) {
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    if (static_cast<acc_type<scalar_t>>(v.val[i]) < acc_type<scalar_t>(0)) {
      v.val[i] = scalar_t(0);
    }
  }
  return v;
}

// The backward of relu at the input: the gradient where skip > 0, else 0 (threshold_backward's rule).
template <int kV, typename scalar_t>
__device__ __forceinline__ Vec<scalar_t, kV> relu_grad_lanes(const GradAndValue<scalar_t, kV>& in) {
  Vec<scalar_t, kV> result = in.grad;
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    if (static_cast<acc_type<scalar_t>>(in.value.val[i]) <= acc_type<scalar_t>(0)) {
      result.val[i] = scalar_t(0);
    }
  }
  return result;
}

// Where an element of the concatenation lies in its part: which part, and its index there (a channel in a
// channels_last row, or a plane of one channel of one image in NCHW).
struct PartIndex {
  bool in_first;
  int64_t index;
};

// The two parts of a concatenation along channels: the first `first` channels, then `second` more.
struct Parts {
  int64_t first;
  int64_t second;

  __host__ __device__ int64_t channels() const { return first + second; }
  // Channel `channel` of a row: a channel of the first part, or channel - first of the second.
  __device__ PartIndex of_channel(int64_t channel) const {
    return channel < first ? PartIndex{true, channel} : PartIndex{false, channel - first};
  }
  // Plane (n, c) of the concatenation (NCHW): plane (n, c) of the first part, or (n, c - first) of the second.
  __device__ PartIndex of_plane(int64_t plane) const {
    const int64_t n = plane / channels(), c = plane - n * channels();
    return c < first ? PartIndex{true, n * first + c} : PartIndex{false, n * second + c - first};
  }
  __device__ int64_t channels_of(const PartIndex& part) const { return part.in_first ? first : second; }
};

// Forward, channels_last: row r of out is [relu(skip row r), x row r]. A thread owns the kV channels at
// channel0 for the whole kernel, so it reads one source with a fixed row stride.
template <typename scalar_t, int kV>
__global__ void __launch_bounds__(kBlockThreads)
    relu_cat_rows_kernel(const scalar_t* skip, const scalar_t* x, scalar_t* out, int64_t rows, Parts parts) {
  const int64_t channels = parts.channels();
  const int64_t channel0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kV;
  if (channel0 >= channels) {
    return;
  }
  const PartIndex part = parts.of_channel(channel0);
  const bool in_skip = part.in_first;
  const scalar_t* source = (in_skip ? skip : x) + part.index;
  const int64_t source_row = parts.channels_of(part);
  strided_loop(
      static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y, rows,
      static_cast<int64_t>(gridDim.x) * blockDim.y,
      [&](int64_t row) { return load_vec<kV>(source, row * source_row); },
      [&](const Vec<scalar_t, kV>& v, int64_t row) {
        store_vec<kV>(out, row * channels + channel0, in_skip ? relu_lanes<kV>(v) : v);
      });
}

// The NCHW kernels' walk: each thread visits the planes blockIdx.x * blockDim.y + threadIdx.y + k * gridDim.x *
// blockDim.y, and in each the kV-vectors (columns) blockIdx.y * blockDim.x + threadIdx.x + k * gridDim.y *
// blockDim.x; for each plane `visit(plane, columns)` gets a function that runs strided_loop(load, store) over
// this thread's columns of it.
template <int kV, typename Visit>
__device__ __forceinline__ void for_each_plane(int64_t planes, int64_t plane_size, const Visit& visit) {
  const int64_t columns = plane_size / kV;
  const int64_t column0 = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (column0 >= columns) {
    return;
  }
  const int64_t column_stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  const auto own_columns = [&](const auto& load, const auto& store) {
    strided_loop(column0, columns, column_stride, load, store);
  };
  for (int64_t plane = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; plane < planes;
       plane += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    visit(plane, own_columns);
  }
}

// Forward, NCHW: plane (n, c) of out is relu(skip plane (n, c)) for c < first, else x plane (n, c - first).
template <typename scalar_t, int kV>
__global__ void __launch_bounds__(kBlockThreads)
    relu_cat_planes_kernel(const scalar_t* skip, const scalar_t* x, scalar_t* out, int64_t planes,
                           Parts parts, int64_t plane_size) {
  for_each_plane<kV>(planes, plane_size, [&](int64_t plane, const auto& own_columns) {
    const PartIndex part = parts.of_plane(plane);
    const bool in_skip = part.in_first;
    const scalar_t* source = (in_skip ? skip : x) + part.index * plane_size;
    scalar_t* target = out + plane * plane_size;
    own_columns([&](int64_t column) { return load_vec<kV>(source, column * kV); },
                [&](const Vec<scalar_t, kV>& v, int64_t column) {
                  store_vec<kV>(target, column * kV, in_skip ? relu_lanes<kV>(v) : v);
                });
  });
}

// Backward, channels_last: grad row r = [grad_skip row r (masked by skip), grad_x row r].
template <typename scalar_t, int kV>
__global__ void __launch_bounds__(kBlockThreads)
    relu_cat_backward_rows_kernel(const scalar_t* grad, const scalar_t* skip, scalar_t* grad_skip,
                                  scalar_t* grad_x, int64_t rows, Parts parts) {
  const int64_t channels = parts.channels();
  const int64_t channel0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kV;
  if (channel0 >= channels) {
    return;
  }
  const PartIndex part = parts.of_channel(channel0);
  const bool in_skip = part.in_first;
  scalar_t* target = (in_skip ? grad_skip : grad_x) + part.index;
  const int64_t target_row = parts.channels_of(part);
  strided_loop(
      static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y, rows,
      static_cast<int64_t>(gridDim.x) * blockDim.y,
      [&](int64_t row) {
        GradAndValue<scalar_t, kV> in{};
        in.grad = load_vec<kV>(grad, row * channels + channel0);
        if (in_skip) {
          in.value = load_vec<kV>(skip, row * parts.first + channel0);
        }
        return in;
      },
      [&](const GradAndValue<scalar_t, kV>& in, int64_t row) {
        store_vec<kV>(target, row * target_row, in_skip ? relu_grad_lanes<kV>(in) : in.grad);
      });
}

// Backward, NCHW: grad plane (n, c) goes to grad_skip plane (n, c) (masked) or grad_x plane (n, c - first).
template <typename scalar_t, int kV>
__global__ void __launch_bounds__(kBlockThreads)
    relu_cat_backward_planes_kernel(const scalar_t* grad, const scalar_t* skip, scalar_t* grad_skip,
                                    scalar_t* grad_x, int64_t planes, Parts parts, int64_t plane_size) {
  for_each_plane<kV>(planes, plane_size, [&](int64_t plane, const auto& own_columns) {
    const PartIndex part = parts.of_plane(plane);
    const bool in_skip = part.in_first;
    const scalar_t* source = grad + plane * plane_size;
    const scalar_t* mask = in_skip ? skip + part.index * plane_size : nullptr;  // read in the skip part only
    scalar_t* target = (in_skip ? grad_skip : grad_x) + part.index * plane_size;
    own_columns(
        [&](int64_t column) {
          GradAndValue<scalar_t, kV> in{};
          in.grad = load_vec<kV>(source, column * kV);
          if (in_skip) {
            in.value = load_vec<kV>(mask, column * kV);
          }
          return in;
        },
        [&](const GradAndValue<scalar_t, kV>& in, int64_t column) {
          store_vec<kV>(target, column * kV, in_skip ? relu_grad_lanes<kV>(in) : in.grad);
        });
  });
}

// Whether kV-wide vectors never straddle the two parts: kV divides both channel counts (rows) or the plane
// (NCHW), and every tensor is 16-byte aligned.
bool parts_vectorizable(const Walk& walk, const Parts& parts, int kV,
                        std::initializer_list<const at::Tensor*> tensors) {
  const bool whole = walk.layout == Layout::kChannelsLast ? parts.first % kV == 0 && parts.second % kV == 0
                                                          : walk.plane % kV == 0;
  return whole && vectorizable(walk, kV, tensors);
}

std::vector<int64_t> sizes_with_channels(const Tensor& t, int64_t channels) {
  return {t.size(0), channels, t.size(2), t.size(3)};
}

Tensor relu_cat(const Tensor& skip_in, const Tensor& x_in) {
  constexpr const char* op = "fastpix2pix::relu_cat";
  check_cuda(x_in, op, "x");
  check_relu_cat_args(skip_in, x_in, op);
  const DeviceGuard guard(x_in.device());
  const Layout layout = layout_of(x_in);
  const Tensor skip = in_layout(skip_in, layout);
  const Tensor x = in_layout(x_in, layout);
  const Parts parts{skip.size(1), x.size(1)};
  Tensor out = empty_in_layout(sizes_with_channels(x, parts.channels()), x.options(), layout);
  const Walk walk = walk_of(out, layout);
  if (walk.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    with_vector_width<scalar_t>(
        parts_vectorizable(walk, parts, vector_width<scalar_t>(), {&skip, &x, &out}), [&](auto width) {
          constexpr int kV = decltype(width)::value;
          const MapLaunch launch = map_launch(walk, kV);
          const scalar_t* skip_data = skip.const_data_ptr<scalar_t>();
          const scalar_t* x_data = x.const_data_ptr<scalar_t>();
          scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
          if (walk.layout == Layout::kChannelsLast) {
            launch_kernel(relu_cat_rows_kernel<scalar_t, kV>, launch.grid, launch.block, 0, skip_data, x_data,
                          out_data, walk.values_per_channel(), parts);
          } else {
            launch_kernel(relu_cat_planes_kernel<scalar_t, kV>, launch.grid, launch.block, 0, skip_data,
                          x_data, out_data, walk.batch * walk.channels, parts, walk.plane);
          }
        });
  });
  return out;
}

std::tuple<Tensor, Tensor> relu_cat_backward(const Tensor& grad_in, const Tensor& skip_in) {
  constexpr const char* op = "fastpix2pix::relu_cat_backward";
  check_cuda(grad_in, op, "grad_out");
  check_relu_cat_backward_args(grad_in, skip_in, op);
  const DeviceGuard guard(grad_in.device());
  const Layout layout = layout_of(grad_in);
  const Tensor grad = in_layout(grad_in, layout);
  const Tensor skip = in_layout(skip_in, layout);
  const Parts parts{skip.size(1), grad.size(1) - skip.size(1)};
  Tensor grad_skip = empty_in_layout(sizes_with_channels(grad, parts.first), grad.options(), layout);
  Tensor grad_x = empty_in_layout(sizes_with_channels(grad, parts.second), grad.options(), layout);
  const Walk walk = walk_of(grad, layout);
  if (walk.numel() == 0) {
    return {grad_skip, grad_x};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), op, [&] {
    with_vector_width<scalar_t>(
        parts_vectorizable(walk, parts, vector_width<scalar_t>(), {&grad, &skip, &grad_skip, &grad_x}),
        [&](auto width) {
          constexpr int kV = decltype(width)::value;
          const MapLaunch launch = map_launch(walk, kV);
          const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
          const scalar_t* skip_data = skip.const_data_ptr<scalar_t>();
          scalar_t* grad_skip_data = grad_skip.mutable_data_ptr<scalar_t>();
          scalar_t* grad_x_data = grad_x.mutable_data_ptr<scalar_t>();
          if (walk.layout == Layout::kChannelsLast) {
            launch_kernel(relu_cat_backward_rows_kernel<scalar_t, kV>, launch.grid, launch.block, 0, grad_data,
                          skip_data, grad_skip_data, grad_x_data, walk.values_per_channel(), parts);
          } else {
            launch_kernel(relu_cat_backward_planes_kernel<scalar_t, kV>, launch.grid, launch.block, 0,
                          grad_data, skip_data, grad_skip_data, grad_x_data, walk.batch * walk.channels, parts,
                          walk.plane);
          }
        });
  });
  return {grad_skip, grad_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpix2pix, CUDA, m) {
  m.impl("relu_cat", &relu_cat);
  m.impl("relu_cat_backward", &relu_cat_backward);
}

}  // namespace fastpix2pix::gpu
