// Building blocks of the CPU kernels: vector loads/stores in the accumulation type, the activation, and the
// one walk order every per-channel kernel uses (strips, below), with its parallel per-channel reduction.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "checks.h"

// The dtypes every kernel takes: float32, float64, bfloat16, float16 (as check_floating admits).
#define FASTPIX2PIX_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, __VA_ARGS__)

namespace fastpix2pix::cpu {

// Arithmetic runs in float for float/bfloat16/float16 data and in double for double data.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
using AccVec = at::vec::Vectorized<acc_t<scalar_t>>;

// `width` (at most one vector) elements as an accumulation-type vector; lanes past `width` are zero.
template <typename scalar_t>
inline AccVec<scalar_t> load(const scalar_t* p, int64_t width) {
  using Vec = AccVec<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return width == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, width);
  } else {
    if (width == Vec::size()) {
      Vec v;
      at::vec::load_to_float(p, v);
      return v;
    }
    return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p, width)));
  }
}

// Stores the first `width` lanes of `v`, rounded to scalar_t.
template <typename scalar_t>
inline void store(scalar_t* p, const AccVec<scalar_t>& v, int64_t width) {
  using Vec = AccVec<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    width == Vec::size() ? v.store(p) : v.store(p, width);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, width);
  }
}

template <typename Vec>
inline typename Vec::value_type sum_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<typename Vec::value_type>([](const Vec& a, const Vec& b) { return a + b; },
                                                           v);
}

// LeakyReLU with slope `negative_slope` (0: ReLU, 1: identity) and its derivative, as nn.LeakyReLU / nn.ReLU
// compute them: z > 0 takes the positive branch, NaN propagates, ReLU(-inf) is 0 (not -inf * 0). At a NaN z
// the two derivatives differ, as PyTorch's do: ReLU's backward tests its output (out <= 0 gets 0, and NaN
// compares false), so the gradient passes; LeakyReLU's tests z > 0, so it is scaled by the slope.
template <typename Vec>
struct Activation {
  Vec slope;
  bool relu;

  explicit Activation(double negative_slope)
      : slope(static_cast<typename Vec::value_type>(negative_slope)), relu(negative_slope == 0.0) {}

  Vec operator()(const Vec& z) const {
    return relu ? at::vec::clamp_min(z, Vec(0)) : Vec::blendv(z * slope, z, z > Vec(0));
  }

  // grad_out times act'(z); only the sign of z is read (so the forward output serves when slope >= 0).
  Vec grad(const Vec& grad_out, const Vec& z) const {
    if (relu) {
      return Vec::blendv(grad_out, Vec(0), z <= Vec(0));  // selected, not multiplied: 0 for an inf grad_out
    }
    return Vec::blendv(grad_out * slope, grad_out, z > Vec(0));
  }
};

// --- strips: the walk order of the per-channel kernels ------------------------------------------------
//
// A strip is the unit of parallel work: in NCHW a run of one channel's plane (`length` elements, every lane
// of every vector the same channel), in channels_last a block of `length` rows of all channels (walked row by
// row; lane i of a vector starting at channel c is channel c + i). Either way each channel the strip covers
// has `length` values in it. Strips are sized so that what a kernel reads twice (the statistics' second
// pass) stays in L1/L2, and both layouts stream through memory in address order.
struct Strip {
  int64_t begin;    // offset of the strip's first element
  int64_t length;   // NCHW: elements; channels_last: rows. Also the values per channel.
  int64_t channel;  // NCHW: the strip's channel; channels_last: 0
  bool broadcast;   // NCHW: every lane is `channel`
};

// Which channels a vector's lanes hold, as a type so that kernels resolve the layout at compile time: the
// per-element functions of the kernels take either and read per-channel values through lanes() and
// strip_lanes().
struct OneChannel {  // NCHW: every lane is channel c
  int64_t c;
};
struct ChannelRun {  // channels_last: lane i is channel c + i
  int64_t c;
};

// The per-channel values (an array indexed by channel, padded to whole vectors) for a vector's lanes.
template <typename Vec>
inline Vec lanes(OneChannel ch, const typename Vec::value_type* values) {
  return Vec(values[ch.c]);
}
template <typename Vec>
inline Vec lanes(ChannelRun ch, const typename Vec::value_type* values) {
  return Vec::loadu(values + ch.c);
}

// A strip's own per-channel results (one slot in NCHW, one per channel in channels_last; see
// StripPlan::slots) for a vector's lanes.
template <typename Vec>
inline Vec strip_lanes(OneChannel, const typename Vec::value_type* results) {
  return Vec(results[0]);
}
template <typename Vec>
inline Vec strip_lanes(ChannelRun ch, const typename Vec::value_type* results) {
  return Vec::loadu(results + ch.c);
}

// Per-channel values in an array padded to whole vectors, so that channels_last vectors load them whole.
template <typename acc>
class ChannelArray {
 public:
  ChannelArray() = default;

  explicit ChannelArray(int64_t channels, acc fill = acc(0))
      : values_(padded_size(channels), fill), channels_(channels) {}

  // The values of a per-channel tensor, or `fill` for an undefined one.
  ChannelArray(const at::Tensor& t, int64_t channels, acc fill) : ChannelArray(channels, fill) {
    if (t.defined()) {
      const at::Tensor values = t.to(c10::CppTypeToScalarType<acc>::value).contiguous();
      std::copy_n(values.const_data_ptr<acc>(), channels, values_.begin());
    }
  }

  static int64_t padded_size(int64_t channels) {
    constexpr int64_t kLanes = at::vec::Vectorized<float>::size();  // the widest vector of any acc type
    return at::divup(channels, kLanes) * kLanes;
  }

  acc* data() { return values_.data(); }
  const acc* data() const { return values_.data(); }
  acc& operator[](int64_t c) { return values_[c]; }
  acc operator[](int64_t c) const { return values_[c]; }
  int64_t size() const { return channels_; }

  // The values as a new (C,) tensor with `options` (its dtype included).
  at::Tensor to_tensor(const at::TensorOptions& options) const {
    at::Tensor t = at::empty({channels_}, options.dtype(c10::CppTypeToScalarType<acc>::value));
    std::copy_n(values_.data(), channels_, t.mutable_data_ptr<acc>());
    return t.to(options.dtype());
  }

 private:
  std::vector<acc> values_;
  int64_t channels_ = 0;
};

// The strips covering an (N, C, H*W) tensor in `layout`, numbered 0..tasks()-1 in memory order, and the
// two walks over a strip: elementwise (for_each_vector) and reducing (sum).
template <typename Vec>
class StripPlan {
 public:
  using acc = typename Vec::value_type;
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kPlaneChunk = 4096;      // NCHW: elements per strip (16 KiB in float: L1)
  static constexpr int64_t kBlockElements = 16384;  // channels_last: elements per block of rows (L2)

  StripPlan(Layout layout, int64_t n, int64_t c, int64_t hw) : channels_(c), hw_(hw) {
    broadcast_ = layout == Layout::kNCHW;
    if (broadcast_) {
      chunks_ = at::divup(hw, kPlaneChunk);
      tasks_ = n * c * chunks_;
      elements_per_task_ = std::max<int64_t>(1, std::min(hw, kPlaneChunk));  // >= 1: it divides
    } else {
      rows_ = n * hw;
      rows_per_strip_ = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(c, 1));
      tasks_ = c > 0 ? at::divup(rows_, rows_per_strip_) : 0;
      elements_per_task_ = std::max<int64_t>(1, rows_per_strip_ * c);
    }
  }

  StripPlan(Layout layout, const at::Tensor& x)
      : StripPlan(layout, x.size(0), x.size(1), x.size(2) * x.size(3)) {}

  int64_t tasks() const { return tasks_; }
  int64_t elements_per_task() const { return elements_per_task_; }
  int64_t channels() const { return channels_; }
  // The size of a strip's per-channel results: 1 in NCHW (its one channel), the padded C otherwise.
  int64_t slots() const { return broadcast_ ? 1 : ChannelArray<acc>::padded_size(channels_); }

  Strip strip(int64_t task) const {
    if (broadcast_) {
      const int64_t plane = task / chunks_;
      const int64_t start = task % chunks_ * kPlaneChunk;
      return {plane * hw_ + start, std::min(kPlaneChunk, hw_ - start), plane % channels_, true};
    }
    const int64_t row = task * rows_per_strip_;
    return {row * channels_, std::min(rows_per_strip_, rows_ - row), 0, false};
  }

  // Calls f(offset, width, channels) for each vector of the strip: `width` valid lanes from element `offset`,
  // holding `channels` (OneChannel or ChannelRun). Whole vectors get a compile-time width, for whole-vector
  // loads and stores.
  template <typename F>
  void for_each_vector(const Strip& s, const F& f) const {
    if (s.broadcast) {
      const OneChannel ch{s.channel};
      int64_t i = 0;
      for (; i + kLanes <= s.length; i += kLanes) {
        f(s.begin + i, kLanes, ch);
      }
      if (i < s.length) {
        f(s.begin + i, s.length - i, ch);
      }
      return;
    }
    for (int64_t row = 0; row < s.length; ++row) {
      for_each_group(s.begin + row * channels_, f);
    }
  }

  // The per-channel sums over the strip of K per-element terms, into out[k][slot]. terms(offset, width,
  // channels) returns K vectors (lanes past `width` are ignored).
  template <int K, typename Terms>
  void sum(const Strip& s, const Terms& terms, const std::array<acc*, K>& out) const {
    if (s.broadcast) {
      const std::array<Vec, K> totals = sum_run<K>(s, terms);
      for (int k = 0; k < K; ++k) {
        out[k][0] = sum_lanes(totals[k]);
      }
      return;
    }
    // channels_last: kRows rows at a time are summed in registers, per group of channels, and then added to
    // the (L1-resident) sums; lanes past the last channel land in the arrays' padding.
    constexpr int64_t kRows = 4;
    for (int k = 0; k < K; ++k) {
      std::fill(out[k], out[k] + slots(), acc(0));
    }
    for (int64_t row = 0; row < s.length; row += kRows) {
      const int64_t rows = std::min(kRows, s.length - row);
      for_each_group(s.begin + row * channels_, [&](int64_t offset, int64_t width, ChannelRun ch) {
        std::array<Vec, K> t = terms(offset, width, ch);
        for (int64_t r = 1; r < rows; ++r) {
          const std::array<Vec, K> next = terms(offset + r * channels_, width, ch);
          for (int k = 0; k < K; ++k) {
            t[k] += next[k];
          }
        }
        for (int k = 0; k < K; ++k) {
          (Vec::loadu(out[k] + ch.c) + t[k]).store(out[k] + ch.c);
        }
      });
    }
  }

 private:
  // NCHW: the sums over one channel's run, per lane. Two accumulators per term hide the latency of the
  // additions (the compiler may not reassociate floating-point sums), and they are folded into the totals
  // every kBlock vectors, which keeps the rounding error of long runs that of short sums.
  template <int K, typename Terms>
  static std::array<Vec, K> sum_run(const Strip& s, const Terms& terms) {
    constexpr int64_t kBlock = 32 * kLanes;
    std::array<Vec, K> total, even, odd;
    total.fill(Vec(0));
    even.fill(Vec(0));
    odd.fill(Vec(0));
    const auto add = [&](std::array<Vec, K>& acc_, int64_t i, int64_t width) {
      const std::array<Vec, K> t = terms(s.begin + i, width, OneChannel{s.channel});
      for (int k = 0; k < K; ++k) {
        acc_[k] += width == kLanes ? t[k] : Vec::set(Vec(0), t[k], width);
      }
    };
    const auto fold = [&] {
      for (int k = 0; k < K; ++k) {
        total[k] += even[k] + odd[k];
        even[k] = odd[k] = Vec(0);
      }
    };
    int64_t i = 0;
    while (i + 2 * kLanes <= s.length) {
      const int64_t block_end = std::min(s.length, i + kBlock);
      for (; i + 2 * kLanes <= block_end; i += 2 * kLanes) {
        add(even, i, kLanes);
        add(odd, i + kLanes, kLanes);
      }
      fold();
    }
    for (; i < s.length; i += kLanes) {
      add(even, i, std::min(kLanes, s.length - i));
    }
    fold();
    return total;
  }

  // channels_last: f(offset, width, channels) for each vector of the row at `offset`.
  template <typename F>
  void for_each_group(int64_t offset, const F& f) const {
    const int64_t whole = channels_ / kLanes * kLanes;
    for (int64_t c = 0; c < whole; c += kLanes) {
      f(offset + c, kLanes, ChannelRun{c});
    }
    if (whole < channels_) {
      f(offset + whole, channels_ - whole, ChannelRun{whole});
    }
  }

  int64_t channels_, hw_;
  bool broadcast_ = true;
  int64_t rows_ = 0, rows_per_strip_ = 1, chunks_ = 1;
  int64_t tasks_ = 0, elements_per_task_ = 1;
};

// A flat tensor of `numel` elements walked as one channel (the losses).
template <typename Vec>
inline StripPlan<Vec> flat_plan(int64_t numel) {
  return StripPlan<Vec>(Layout::kNCHW, 1, 1, numel);
}

// Runs f(task, strip) for every strip, the tasks split into contiguous ranges across threads; small
// tensors stay on one thread, where the threads would cost more than they save.
template <typename Vec, typename F>
inline void parallel_for_strips(const StripPlan<Vec>& plan, const F& f) {
  constexpr int64_t kMinElementsPerThread = 16384;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / plan.elements_per_task());
  at::parallel_for(0, plan.tasks(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      f(task, plan.strip(task));
    }
  });
}

// Per-channel sums of K per-element terms (see StripPlan::sum) over the whole tensor: summed per strip in
// parallel, then across strips in a fixed order (results do not depend on timing) and in double (the
// rounding of float would add up over the many strips of a large batch).
template <int K, typename Vec, typename Terms>
std::array<ChannelArray<double>, K> sum_per_channel(const StripPlan<Vec>& plan, const Terms& terms) {
  using acc = typename Vec::value_type;
  const int64_t slots = plan.slots();
  std::vector<acc> partial(plan.tasks() * K * slots);
  parallel_for_strips(plan, [&](int64_t task, const Strip& s) {
    std::array<acc*, K> out;
    for (int k = 0; k < K; ++k) {
      out[k] = partial.data() + (task * K + k) * slots;
    }
    plan.template sum<K>(s, terms, out);
  });
  std::array<ChannelArray<double>, K> totals;
  totals.fill(ChannelArray<double>(plan.channels()));
  for (int64_t task = 0; task < plan.tasks(); ++task) {
    const Strip s = plan.strip(task);
    const int64_t count = s.broadcast ? 1 : plan.channels();
    for (int k = 0; k < K; ++k) {
      const acc* strip_sums = partial.data() + (task * K + k) * slots;
      double* total = totals[k].data() + s.channel;
      for (int64_t c = 0; c < count; ++c) {
        total[c] += static_cast<double>(strip_sums[c]);
      }
    }
  }
  return totals;
}

}  // namespace fastpix2pix::cpu
