// Device helpers shared by the CUDA kernels: vector memory access, the activation and its derivative, the
// two per-channel reductions (Welford statistics and plain sums) and the deterministic block reduction.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastpix2pix::gpu {

constexpr int kBlockThreads = 256;  // every kernel's block has at most this many threads
constexpr int kVectorBytes = 16;    // the widest access one thread issues (LDG.128 / STG.128)
constexpr int kUnroll = 4;          // loads a thread issues before it consumes the first one

// The accumulation type, which is also the statistics dtype of checks.h (stats_dtype): float for
// float/bfloat16/float16 inputs, double for double.
template <typename scalar_t>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccumulateType<scalar_t>::type;

// Elements of scalar_t in one 16-byte vector: 8 for bfloat16/float16, 4 for float, 2 for double.
template <typename scalar_t>
constexpr int vector_width() {
  return kVectorBytes / static_cast<int>(sizeof(scalar_t));
}

// kV consecutive elements read or written as one instruction. The alignment equals the size, so the
// compiler emits a single 16-byte access for kV = vector_width(); the host launches a kV > 1 kernel only
// after checking that every vector starts at a multiple of that size (walk.cuh: vectorizable).
template <typename T, int kV>
struct alignas(sizeof(T) * kV) Vec {
  T val[kV];
};

// The raw bits of up to 16 bytes as a native vector type. Vectors are moved through these, and stored with
// the __stwb intrinsic: a Vec built lane by lane and stored as a struct was split by the compiler (nvcc 13.0)
// into kV scalar stores in some unrolled iterations.
template <int kBytes>
struct Bits;
template <>
struct Bits<16> {
  using type = uint4;
};
template <>
struct Bits<8> {
  using type = uint2;
};
template <>
struct Bits<4> {
  using type = unsigned int;
};
template <>
struct Bits<2> {
  using type = unsigned short;
};
template <>
struct Bits<1> {
  using type = unsigned char;
};

// A vector's memory access in 16-byte pieces (one for the 16-byte vectors of the kernels; two for the
// 32-byte float vectors that a bfloat16 pass may read beside its own).
template <typename T, int kV>
struct VecAccess {
  static constexpr int kBytes = static_cast<int>(sizeof(T)) * kV;
  static constexpr int kPieceBytes = kBytes < kVectorBytes ? kBytes : kVectorBytes;
  static constexpr int kPieces = kBytes / kPieceBytes;
  using Piece = typename Bits<kPieceBytes>::type;
};

// Called with the address and size of every piece access. A GPU faults on a misaligned one by itself; the CPU
// emulation (tests/cuda_emulation/emulation.h), on which x86 would read it silently, defines this to check.
#ifndef FASTPIX2PIX_CHECK_ALIGNED_ACCESS
#define FASTPIX2PIX_CHECK_ALIGNED_ACCESS(address, bytes)
#endif

template <int kV, typename T>
__device__ __forceinline__ Vec<T, kV> load_vec(const T* base, int64_t offset) {
  using Access = VecAccess<T, kV>;
  const auto* source = reinterpret_cast<const typename Access::Piece*>(base + offset);
  FASTPIX2PIX_CHECK_ALIGNED_ACCESS(source, Access::kPieceBytes);
  typename Access::Piece pieces[Access::kPieces];
#pragma unroll
  for (int i = 0; i < Access::kPieces; ++i) {
    pieces[i] = source[i];
  }
  Vec<T, kV> value;
  memcpy(&value, pieces, Access::kBytes);
  return value;
}

template <int kV, typename T>
__device__ __forceinline__ void store_vec(T* base, int64_t offset, const Vec<T, kV>& value) {
  using Access = VecAccess<T, kV>;
  typename Access::Piece pieces[Access::kPieces];
  memcpy(pieces, &value, Access::kBytes);
  auto* target = reinterpret_cast<typename Access::Piece*>(base + offset);
  FASTPIX2PIX_CHECK_ALIGNED_ACCESS(target, Access::kPieceBytes);
#pragma unroll
  for (int i = 0; i < Access::kPieces; ++i) {
    __stwb(target + i, pieces[i]);  // one st.global (default write-back policy) per piece, never split
  }
}

// Math in the accumulation type (the float overloads, not a silent promotion to double).
__device__ __forceinline__ float device_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double device_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float device_exp(float x) { return expf(x); }
__device__ __forceinline__ double device_exp(double x) { return exp(x); }
__device__ __forceinline__ float device_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double device_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float device_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double device_abs(double x) { return fabs(x); }

// The activation of every op: LeakyReLU with `slope` (0 is ReLU, 1 the identity). A zero slope selects 0
// rather than multiplying, as PyTorch's relu does: -inf gives 0, not NaN; NaN stays NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t z, acc_t slope) {
  if (z > acc_t(0)) {
    return z;
  }
  if (slope == acc_t(0)) {
    return z != z ? z : acc_t(0);
  }
  return z * slope;
}

// grad * act'(z), as PyTorch's backward kernels take it. LeakyReLU (leaky_relu_backward): grad for z > 0,
// else grad * slope, so a NaN z gets grad * slope. ReLU (threshold_backward, which tests the output): 0 for
// out <= 0, else grad, so a NaN z (NaN output) passes the gradient, and an inf gradient where z <= 0 is
// selected away (0, not inf * 0).
template <typename acc_t>
__device__ __forceinline__ acc_t activation_backward(acc_t grad, acc_t z, acc_t slope) {
  if (slope == acc_t(0)) {
    return z <= acc_t(0) ? acc_t(0) : grad;
  }
  return z > acc_t(0) ? grad : grad * slope;
}

// --- reductions -----------------------------------------------------------------------------------------
// A Reducer names the partial state of one channel (Lane: kFields values of acc_t, so that the workspace
// stores it field by field), its identity and an associative merge. Merges always happen in a fixed order.

// Welford statistics: count, mean and m2, the sum of squared deviations from the mean. Two states merge
// with Chan et al.'s formula, which moves the mean by a weighted difference of the means instead of
// subtracting large sums, so a channel whose mean is large against its spread keeps its precision.
template <typename acc>
struct Welford {
  using acc_t = acc;
  static constexpr int kCount = 0;
  static constexpr int kMean = 1;
  static constexpr int kM2 = 2;
  static constexpr int kFields = 3;
  struct Lane {
    acc_t v[kFields];
  };

  __device__ static Lane identity() { return Lane{}; }

  __device__ static Lane merge(const Lane& a, const Lane& b) {
    const acc_t count = a.v[kCount] + b.v[kCount];
    const acc_t weight = count > acc_t(0) ? b.v[kCount] / count : acc_t(0);
    const acc_t delta = b.v[kMean] - a.v[kMean];
    Lane out;
    out.v[kCount] = count;
    out.v[kMean] = a.v[kMean] + delta * weight;
    out.v[kM2] = a.v[kM2] + b.v[kM2] + delta * delta * a.v[kCount] * weight;
    return out;
  }
};

// The running Welford state of one thread's kV lanes. Every step adds one value to each lane, so the lanes
// share the count and its reciprocal: one division per vector, not per element.
template <typename acc_t, int kV>
struct WelfordAccumulator {
  using Reducer = Welford<acc_t>;
  int count = 0;
  acc_t mean[kV] = {};
  acc_t m2[kV] = {};

  __device__ __forceinline__ void add(const acc_t (&value)[kV]) {
    ++count;
    const acc_t inv_count = acc_t(1) / static_cast<acc_t>(count);
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const acc_t delta = value[i] - mean[i];
      mean[i] += delta * inv_count;
      m2[i] += delta * (value[i] - mean[i]);
    }
  }

  __device__ typename Reducer::Lane lane(int i) const {
    typename Reducer::Lane out;
    out.v[Reducer::kCount] = static_cast<acc_t>(count);
    out.v[Reducer::kMean] = mean[i];
    out.v[Reducer::kM2] = m2[i];
    return out;
  }
};

// kN independent sums per channel.
template <typename acc, int kN>
struct Sum {
  using acc_t = acc;
  static constexpr int kFields = kN;
  struct Lane {
    acc_t v[kFields];
  };

  __device__ static Lane identity() { return Lane{}; }

  __device__ static Lane merge(const Lane& a, const Lane& b) {
    Lane out;
#pragma unroll
    for (int f = 0; f < kN; ++f) {
      out.v[f] = a.v[f] + b.v[f];
    }
    return out;
  }
};

template <typename acc_t, int kV, int kN>
struct SumAccumulator {
  using Reducer = Sum<acc_t, kN>;
  acc_t sum[kN][kV] = {};

  __device__ typename Reducer::Lane lane(int i) const {
    typename Reducer::Lane out;
#pragma unroll
    for (int f = 0; f < kN; ++f) {
      out.v[f] = sum[f][i];
    }
    return out;
  }
};

// The kV lanes of an accumulator merged into one state, lane 0 first (for walks whose lanes all belong to
// one channel).
template <int kV, class Accumulator>
__device__ typename Accumulator::Reducer::Lane merge_lanes(const Accumulator& acc) {
  auto merged = acc.lane(0);
#pragma unroll
  for (int i = 1; i < kV; ++i) {
    merged = Accumulator::Reducer::merge(merged, acc.lane(i));
  }
  return merged;
}

// Dynamic shared memory of the block reductions; every kernel of this library declares it the same way.
extern __shared__ __align__(16) unsigned char block_shared_memory[];

// Merges the partial states of a block into row 0, column by column. The threads hold the slots of a
// [height][width] grid (thread (x, y) slot (y, x)), kLanes states each; the states of one column are
// merged pairwise along a tree that depends only on `height`, so the result is reproducible bit for bit.
// Row 0's threads get the merged states back in `lanes`. Every thread of the block must call this (it
// synchronises), with width * height * kLanes * sizeof(Lane) bytes of dynamic shared memory.
template <class Reducer, int kLanes>
__device__ void block_reduce_columns(typename Reducer::Lane (&lanes)[kLanes], int x, int y, int width,
                                     int height) {
  using Lane = typename Reducer::Lane;
  Lane* slots = reinterpret_cast<Lane*>(block_shared_memory);
  Lane* mine = slots + (y * width + x) * kLanes;
#pragma unroll
  for (int l = 0; l < kLanes; ++l) {
    mine[l] = lanes[l];
  }
  __syncthreads();
  int span = 1;
  while (span < height) {
    span *= 2;
  }
  for (int half = span / 2; half > 0; half /= 2) {
    if (y < half && y + half < height) {
      const Lane* other = mine + half * width * kLanes;
#pragma unroll
      for (int l = 0; l < kLanes; ++l) {
        mine[l] = Reducer::merge(mine[l], other[l]);
      }
    }
    __syncthreads();
  }
  if (y == 0) {
#pragma unroll
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] = mine[l];
    }
  }
}

// Visits index = first, first + stride, ... < end. kUnroll loads are issued before the first visit
// consumes its data, so that each thread keeps several memory requests in flight.
template <class Load, class Visit>
__device__ __forceinline__ void strided_loop(int64_t first, int64_t end, int64_t stride, const Load& load,
                                             const Visit& visit) {
  int64_t index = first;
  for (; index + (kUnroll - 1) * stride < end; index += kUnroll * stride) {
    decltype(load(index)) loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      loaded[u] = load(index + u * stride);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      visit(loaded[u], index + u * stride);
    }
  }
  for (; index < end; index += stride) {
    visit(load(index), index);
  }
}

}  // namespace fastpix2pix::gpu
