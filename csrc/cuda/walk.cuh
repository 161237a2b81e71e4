// The generic CUDA kernels that walk a tensor channel by channel (or as a flat array), and their host-side
// launchers. An op supplies a "pass" (see bn_act.cu): what one position loads, and what it computes,
// stores or accumulates there; the kernels here decide which thread visits which position.
//
// Layouts walked directly (others are copied first: checks.h, OutputLike and walk_layout):
//  * channels_last: a row-major [rows = N*H*W, C] matrix. Thread (x, y) of block (bx, by) owns the kV
//    channels starting at (by * blockDim.x + x) * kV for the whole kernel, computes their parameters once
//    and walks the rows bx * blockDim.y + y + k * gridDim.x * blockDim.y. A warp reads 32 consecutive
//    vectors (whole consecutive rows when C / kV <= 32): coalesced 16-byte accesses.
//  * NCHW: N*C planes of H*W contiguous elements of one channel; threads walk the vectors of a plane.
//    An [N, C, 1, 1] tensor is both layouts and is walked as channels_last (vectors along C).
//  * flat: dense tensors whose every element is treated alike (the losses, the bias-free activation).
//
// Per-channel reductions are two-level and deterministic, without atomics: each block merges its threads'
// states in shared memory along a fixed tree and writes one partial state per channel into a workspace
// from the caching allocator; a second small kernel merges each channel's partials in a fixed order and
// finalises them. When the grid has a single block per channel, that block finalises directly (one
// launch). The grid depends only on the shape and the device, so results are bitwise reproducible.
//
// Nothing here synchronises with the host or allocates by data: every launch goes to the current stream,
// so the ops can be captured in CUDA graphs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "checks.h"
#include "cuda/device_utils.cuh"
#include "cuda/runtime.cuh"

namespace fastpix2pix::gpu {

// --- kernels ----------------------------------------------------------------------------------------------

// The channel of vector lane i at a position whose first lane is channel0: consecutive channels in
// channels_last (kLanesAreChannels), all the same channel in NCHW.
template <bool kLanesAreChannels>
__device__ __forceinline__ int64_t lane_channel(int64_t channel0, int i) {
  return kLanesAreChannels ? channel0 + i : channel0;
}

// What a backward pass reads at one position: the incoming gradient and the forward tensor whose
// activation it differentiates (x, or the forward output).
template <typename scalar_t, int kV>
struct GradAndValue {
  Vec<scalar_t, kV> grad;
  Vec<scalar_t, kV> value;
};

template <int kV, typename scalar_t, typename acc_t>
__device__ __forceinline__ void to_acc(const Vec<scalar_t, kV>& in, acc_t (&out)[kV]) {
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    out[i] = static_cast<acc_t>(in.val[i]);
  }
}

// A reduction's result: the finaliser when this block is the channel's only one, else a partial state in
// the workspace, stored field-major ([field][partial][channel]) so that the merge kernel's reads coalesce.
template <class Reducer, class Finalizer>
__device__ void emit(const Finalizer& finalize, typename Reducer::acc_t* partials, int64_t num_partials,
                     int64_t partial, int64_t channels, int64_t channel, const typename Reducer::Lane& lane) {
  if (num_partials == 1) {
    finalize(channel, lane);
    return;
  }
#pragma unroll
  for (int f = 0; f < Reducer::kFields; ++f) {
    partials[(f * num_partials + partial) * channels + channel] = lane.v[f];
  }
}

template <class Pass>
__global__ void __launch_bounds__(kBlockThreads)
    channels_last_map_kernel(const Pass pass, int64_t rows, int64_t channels) {
  constexpr int kV = Pass::kV;
  const int64_t channel0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kV;
  if (channel0 >= channels) {
    return;
  }
  const auto params = pass.template params<true>(channel0);
  strided_loop(
      static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y, rows,
      static_cast<int64_t>(gridDim.x) * blockDim.y,
      [&](int64_t row) { return pass.load(row * channels + channel0); },
      [&](const auto& loaded, int64_t row) { pass.apply(params, loaded, row * channels + channel0); });
}

template <class Pass>
__global__ void __launch_bounds__(kBlockThreads)
    planes_map_kernel(const Pass pass, int64_t planes, int64_t channels, int64_t plane_size) {
  constexpr int kV = Pass::kV;
  const int64_t columns = plane_size / kV;
  const int64_t column0 = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (column0 >= columns) {
    return;
  }
  const int64_t column_stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  const int64_t plane_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  int64_t plane = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  // The channel follows the plane without a division per plane.
  int64_t channel = plane % channels;
  const int64_t channel_step = plane_stride % channels;
  for (; plane < planes; plane += plane_stride) {
    const auto params = pass.template params<false>(channel);
    const int64_t base = plane * plane_size;
    strided_loop(
        column0, columns, column_stride, [&](int64_t column) { return pass.load(base + column * kV); },
        [&](const auto& loaded, int64_t column) { pass.apply(params, loaded, base + column * kV); });
    channel += channel_step;
    if (channel >= channels) {
      channel -= channels;
    }
  }
}

template <class Pass>
__global__ void __launch_bounds__(kBlockThreads) flat_map_kernel(const Pass pass, int64_t vectors) {
  constexpr int kV = Pass::kV;
  strided_loop(
      static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, vectors,
      static_cast<int64_t>(gridDim.x) * blockDim.x, [&](int64_t i) { return pass.load(i * kV); },
      [&](const auto& loaded, int64_t i) { pass.apply(loaded, i * kV); });
}

// Partial states: one per block row (gridDim.x of them) and channel.
template <class Pass>
__global__ void __launch_bounds__(kBlockThreads)
    channels_last_reduce_kernel(const Pass pass, int64_t rows, int64_t channels,
                                typename Pass::Reducer::acc_t* partials) {
  using Reducer = typename Pass::Reducer;
  constexpr int kV = Pass::kV;
  const int64_t channel0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kV;
  const bool active = channel0 < channels;  // the last channel tile may be partly empty
  typename Pass::Accumulator acc{};
  if (active) {
    const auto params = pass.template params<true>(channel0);
    strided_loop(
        static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y, rows,
        static_cast<int64_t>(gridDim.x) * blockDim.y,
        [&](int64_t row) { return pass.load(row * channels + channel0); },
        [&](const auto& loaded, int64_t row) {
          pass.accumulate(acc, params, loaded, row * channels + channel0);
        });
  }
  typename Reducer::Lane lanes[kV];
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    lanes[i] = acc.lane(i);
  }
  block_reduce_columns<Reducer, kV>(lanes, threadIdx.x, threadIdx.y, blockDim.x, blockDim.y);
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      emit<Reducer>(pass.finalize, partials, gridDim.x, blockIdx.x, channels, channel0 + i, lanes[i]);
    }
  }
}

// Block (c, by, bz) reduces channel c over the images by + k * gridDim.y (rows of the block) and the plane
// vectors of column tile bz; partial state number by * gridDim.z + bz.
template <class Pass>
__global__ void __launch_bounds__(kBlockThreads)
    planes_reduce_kernel(const Pass pass, int64_t batch, int64_t channels, int64_t plane_size,
                         typename Pass::Reducer::acc_t* partials) {
  using Reducer = typename Pass::Reducer;
  constexpr int kV = Pass::kV;
  const int64_t channel = blockIdx.x;
  const int64_t columns = plane_size / kV;
  const int64_t column0 = static_cast<int64_t>(blockIdx.z) * blockDim.x + threadIdx.x;
  const int64_t column_stride = static_cast<int64_t>(gridDim.z) * blockDim.x;
  typename Pass::Accumulator acc{};
  if (column0 < columns) {
    const auto params = pass.template params<false>(channel);
    for (int64_t n = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; n < batch;
         n += static_cast<int64_t>(gridDim.y) * blockDim.y) {
      const int64_t base = (n * channels + channel) * plane_size;
      strided_loop(
          column0, columns, column_stride, [&](int64_t column) { return pass.load(base + column * kV); },
          [&](const auto& loaded, int64_t column) {
            pass.accumulate(acc, params, loaded, base + column * kV);
          });
    }
  }
  typename Reducer::Lane lane[1] = {merge_lanes<kV>(acc)};
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  block_reduce_columns<Reducer, 1>(lane, 0, thread, 1, blockDim.x * blockDim.y);
  if (thread == 0) {
    emit<Reducer>(pass.finalize, partials, static_cast<int64_t>(gridDim.y) * gridDim.z,
                  static_cast<int64_t>(blockIdx.y) * gridDim.z + blockIdx.z, channels, channel, lane[0]);
  }
}

// The whole tensor as one "channel": partial state number blockIdx.x.
template <class Pass>
__global__ void __launch_bounds__(kBlockThreads)
    flat_reduce_kernel(const Pass pass, int64_t vectors, typename Pass::Reducer::acc_t* partials) {
  using Reducer = typename Pass::Reducer;
  constexpr int kV = Pass::kV;
  typename Pass::Accumulator acc{};
  strided_loop(
      static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, vectors,
      static_cast<int64_t>(gridDim.x) * blockDim.x, [&](int64_t i) { return pass.load(i * kV); },
      [&](const auto& loaded, int64_t i) { pass.accumulate(acc, loaded, i * kV); });
  typename Reducer::Lane lane[1] = {merge_lanes<kV>(acc)};
  block_reduce_columns<Reducer, 1>(lane, 0, threadIdx.x, 1, blockDim.x);
  if (threadIdx.x == 0) {
    emit<Reducer>(pass.finalize, partials, gridDim.x, blockIdx.x, 1, 0, lane[0]);
  }
}

// The second level: thread (x, y) merges partials y, y + blockDim.y, ... of channel blockIdx.x *
// blockDim.x + x in that order, then the block merges the blockDim.y results along the fixed tree.
template <class Reducer, class Finalizer>
__global__ void __launch_bounds__(kBlockThreads)
    merge_partials_kernel(const Finalizer finalize, const typename Reducer::acc_t* partials,
                          int64_t num_partials, int64_t channels) {
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = channel < channels;
  typename Reducer::Lane lane[1] = {Reducer::identity()};
  if (active) {
    for (int64_t p = threadIdx.y; p < num_partials; p += blockDim.y) {
      typename Reducer::Lane partial;
#pragma unroll
      for (int f = 0; f < Reducer::kFields; ++f) {
        partial.v[f] = partials[(f * num_partials + p) * channels + channel];
      }
      lane[0] = Reducer::merge(lane[0], partial);
    }
  }
  block_reduce_columns<Reducer, 1>(lane, threadIdx.x, threadIdx.y, blockDim.x, blockDim.y);
  if (threadIdx.y == 0 && active) {
    finalize(channel, lane[0]);
  }
}

// --- host side: shapes, layouts, launches ------------------------------------------------------------------

// How a 4-D tensor is walked: its layout and N, C, H*W.
struct Walk {
  Layout layout;
  int64_t batch;
  int64_t channels;
  int64_t plane;  // H * W

  int64_t values_per_channel() const { return batch * plane; }
  int64_t numel() const { return batch * channels * plane; }
};

// The walk of a 4-D tensor laid out in `layout` (NCHW- or channels_last-contiguous). An [N, C, 1, 1] tensor
// is both in memory and is walked as channels_last rows of C, vectorised along C, rather than as N*C planes
// of one element.
inline Walk walk_of(const at::Tensor& t, Layout layout) {
  const int64_t plane = t.size(2) * t.size(3);
  return {plane == 1 ? Layout::kChannelsLast : layout, t.size(0), t.size(1), plane};
}

inline bool is_aligned(const void* pointer, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % static_cast<uintptr_t>(bytes) == 0;
}

// Whether kV-wide vectors tile the walk: rows (channels_last) or planes (NCHW) hold whole vectors, so with
// aligned base pointers every vector is aligned. A view with a storage offset may not be aligned; the
// caching allocator's blocks are (512 bytes).
inline bool rows_hold_vectors(const Walk& walk, int kV) {
  return (walk.layout == Layout::kChannelsLast ? walk.channels : walk.plane) % kV == 0;
}

// Whether the 16-byte kernels apply to a walk: rows/planes hold whole vectors of `vector` elements and
// every tensor's data is 16-byte aligned.
inline bool vectorizable(const Walk& walk, int vector, std::initializer_list<const at::Tensor*> tensors) {
  return rows_hold_vectors(walk, vector) &&
         std::all_of(tensors.begin(), tensors.end(),
                     [](const at::Tensor* t) { return is_aligned(t->const_data_ptr(), kVectorBytes); });
}

// The same for a flat walk of `numel` elements. `vector_bytes` is the alignment one vector of the widest
// tensor needs (more than 16 when a pass reads kV elements of a wider type too).
inline bool flat_vectorizable(int64_t numel, int vector, std::initializer_list<const at::Tensor*> tensors,
                              int64_t vector_bytes = kVectorBytes) {
  return numel % vector == 0 && std::all_of(tensors.begin(), tensors.end(), [&](const at::Tensor* t) {
           return is_aligned(t->const_data_ptr(), vector_bytes);
         });
}

// Runs f(std::integral_constant<int, kV>) with kV = 16 bytes of scalar_t when `vectorize`, else 1.
template <typename scalar_t, class F>
void with_vector_width(bool vectorize, const F& f) {
  if (vectorize) {
    f(std::integral_constant<int, vector_width<scalar_t>()>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// The CUDA kernel runs when any tensor argument is on a CUDA device. The input that decides the device must
// be one; check_same_device (checks.h) then rejects every other argument that is elsewhere.
inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(on_kernel_device(t), op, ": ", name, " is on ", t.device(),
              " but another argument is on a CUDA device; all tensors must be on one device");
}

// A pointer to a contiguous per-channel vector, or null for an undefined (None) one.
template <typename T>
const T* optional_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Grid sizes. Map kernels get one wave of resident blocks (2048 threads per SM) and loop; reductions get
// fewer (kReduceBlocksPerSm): with kUnroll 16-byte loads per thread that still keeps enough bytes in flight,
// and it keeps the partial states (written and re-read through L2) few. A reduction thread gets at least
// kMinVectorsPerThread vectors when the tensor is large enough, so small layers use fewer blocks.
constexpr int64_t kMapBlocksPerSm = 2048 / kBlockThreads;
constexpr int64_t kReduceBlocksPerSm = 2;
constexpr int64_t kMinVectorsPerThread = 8;
constexpr int64_t kMaxGridYZ = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A 2-D block of kBlockThreads (or fewer) threads, x along `columns` (up to all of them), y along rows.
inline dim3 block_for_columns(int64_t columns) {
  const int64_t x = std::clamp<int64_t>(columns, 1, kBlockThreads);
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(kBlockThreads / x));
}

inline dim3 grid_of(int64_t x, int64_t y = 1, int64_t z = 1) {
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

inline void check_grid_yz(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= kMaxGridYZ, "fastpix2pix: too many ", what, " for one CUDA grid (", blocks, ")");
}

// The grid and block of a map kernel over a walk in kV-wide vectors (one wave of resident blocks):
// channels_last, x along the vectors of a row and grid.y over tiles of them, y and grid.x along the rows;
// NCHW, x along the vectors of a plane and grid.y over tiles of them, y and grid.x along the N*C planes.
struct MapLaunch {
  dim3 grid;
  dim3 block;
};

inline MapLaunch map_launch(const Walk& walk, int kV) {
  const int64_t max_blocks = sm_count() * kMapBlocksPerSm;
  if (walk.layout == Layout::kChannelsLast) {
    const int64_t columns = walk.channels / kV;
    const dim3 block = block_for_columns(columns);
    const int64_t tiles = ceil_div(columns, block.x);
    check_grid_yz(tiles, "channels");
    const int64_t rows = walk.values_per_channel();
    const int64_t row_blocks =
        std::clamp<int64_t>(ceil_div(rows, block.y), 1, std::max<int64_t>(1, max_blocks / tiles));
    return {grid_of(row_blocks, tiles), block};
  }
  const int64_t columns = walk.plane / kV;
  const dim3 block = block_for_columns(columns);
  const int64_t planes = walk.batch * walk.channels;
  int64_t plane_blocks = ceil_div(planes, block.y);
  // Few large planes (small batch): split the planes into column tiles too, to fill the device.
  const int64_t tiles =
      std::clamp<int64_t>(std::min(ceil_div(columns, block.x), max_blocks / plane_blocks), 1, kMaxGridYZ);
  plane_blocks = std::clamp<int64_t>(plane_blocks, 1, std::max<int64_t>(1, max_blocks / tiles));
  return {grid_of(plane_blocks, tiles), block};
}

// Runs pass.apply over every vector of a walk (per-channel parameters).
template <class Pass>
void launch_map(const Pass& pass, const Walk& walk) {
  if (walk.numel() == 0) {
    return;
  }
  const MapLaunch launch = map_launch(walk, Pass::kV);
  if (walk.layout == Layout::kChannelsLast) {
    launch_kernel(channels_last_map_kernel<Pass>, launch.grid, launch.block, 0, pass,
                  walk.values_per_channel(), walk.channels);
  } else {
    launch_kernel(planes_map_kernel<Pass>, launch.grid, launch.block, 0, pass, walk.batch * walk.channels,
                  walk.channels, walk.plane);
  }
}

// Runs pass.apply over every vector of a dense tensor of `numel` elements.
template <class Pass>
void launch_flat_map(const Pass& pass, int64_t numel) {
  constexpr int kV = Pass::kV;
  const int64_t vectors = numel / kV;
  if (vectors == 0) {
    return;
  }
  const int64_t blocks =
      std::clamp<int64_t>(ceil_div(vectors, kBlockThreads), 1, sm_count() * kMapBlocksPerSm);
  launch_kernel(flat_map_kernel<Pass>, grid_of(blocks), dim3(kBlockThreads), 0, pass, vectors);
}

// The partial-state workspace of a reduction with more than one block per channel (none otherwise).
template <class Reducer>
struct Partials {
  at::Tensor storage;
  typename Reducer::acc_t* data = nullptr;

  Partials(int64_t num_partials, int64_t channels, const at::TensorOptions& options) {
    if (num_partials > 1) {
      storage = at::empty({Reducer::kFields * num_partials * channels},
                          options.dtype(c10::CppTypeToScalarType<typename Reducer::acc_t>::value));
      data = storage.mutable_data_ptr<typename Reducer::acc_t>();
    }
  }
};

template <class Reducer, class Finalizer>
void launch_merge_partials(const Finalizer& finalize, const Partials<Reducer>& partials, int64_t num_partials,
                           int64_t channels) {
  if (num_partials <= 1) {
    return;
  }
  // x along channels (coalesced reads of one partial), y along the partials of a channel.
  const dim3 block = block_for_columns(std::min<int64_t>(channels, 32));
  const size_t shared = block.x * block.y * sizeof(typename Reducer::Lane);
  launch_kernel(merge_partials_kernel<Reducer, Finalizer>, grid_of(ceil_div(channels, block.x)), block,
                shared, finalize, partials.data, num_partials, channels);
}

// Reduces every channel of a walk with pass.accumulate, then pass.finalize(channel, state) writes the
// result. `options` gives the device for the workspace.
template <class Pass>
void launch_channel_reduce(const Pass& pass, const Walk& walk, const at::TensorOptions& options) {
  using Reducer = typename Pass::Reducer;
  using Lane = typename Reducer::Lane;
  constexpr int kV = Pass::kV;
  if (walk.channels == 0) {
    return;
  }
  const int64_t max_blocks = sm_count() * kReduceBlocksPerSm;
  int64_t num_partials = 0;
  if (walk.layout == Layout::kChannelsLast) {
    const int64_t columns = walk.channels / kV;
    const dim3 block = block_for_columns(columns);
    const int64_t tiles = ceil_div(columns, block.x);
    check_grid_yz(tiles, "channels");
    const int64_t rows = walk.values_per_channel();
    num_partials = std::clamp<int64_t>(ceil_div(rows, block.y * kMinVectorsPerThread), 1,
                                       std::max<int64_t>(1, max_blocks / tiles));
    const Partials<Reducer> partials(num_partials, walk.channels, options);
    const size_t shared = block.x * block.y * kV * sizeof(Lane);
    launch_kernel(channels_last_reduce_kernel<Pass>, grid_of(num_partials, tiles), block, shared, pass, rows,
                  walk.channels, partials.data);
    launch_merge_partials<Reducer>(pass.finalize, partials, num_partials, walk.channels);
  } else {
    const int64_t columns = walk.plane / kV;
    const dim3 block = block_for_columns(columns);
    const int64_t per_channel = std::max<int64_t>(1, max_blocks / walk.channels);
    const int64_t image_blocks =
        std::clamp<int64_t>(ceil_div(walk.batch, block.y), 1, std::min(per_channel, kMaxGridYZ));
    const int64_t tiles =
        std::clamp<int64_t>(ceil_div(columns, block.x * kMinVectorsPerThread), 1,
                            std::min(std::max<int64_t>(1, per_channel / image_blocks), kMaxGridYZ));
    num_partials = image_blocks * tiles;
    const Partials<Reducer> partials(num_partials, walk.channels, options);
    const size_t shared = block.x * block.y * sizeof(Lane);
    launch_kernel(planes_reduce_kernel<Pass>, grid_of(walk.channels, image_blocks, tiles), block, shared,
                  pass, walk.batch, walk.channels, walk.plane, partials.data);
    launch_merge_partials<Reducer>(pass.finalize, partials, num_partials, walk.channels);
  }
}

// Reduces a dense tensor of `numel` elements to one state with pass.accumulate; pass.finalize(0, state).
template <class Pass>
void launch_flat_reduce(const Pass& pass, int64_t numel, const at::TensorOptions& options) {
  using Reducer = typename Pass::Reducer;
  constexpr int kV = Pass::kV;
  const int64_t vectors = numel / kV;
  const int64_t num_partials = std::clamp<int64_t>(ceil_div(vectors, kBlockThreads * kMinVectorsPerThread), 1,
                                                   sm_count() * kReduceBlocksPerSm);
  const Partials<Reducer> partials(num_partials, 1, options);
  const size_t shared = kBlockThreads * sizeof(typename Reducer::Lane);
  launch_kernel(flat_reduce_kernel<Pass>, grid_of(num_partials), dim3(kBlockThreads), shared, pass, vectors,
                partials.data);
  launch_merge_partials<Reducer>(pass.finalize, partials, num_partials, 1);
}

}  // namespace fastpix2pix::gpu
