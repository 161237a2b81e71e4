// CUDA kernels of the losses (schemas and exact semantics: fastpix2pix.cpp): the mean loss and its gradient
// with respect to the input in one pass over the data. The loss is accumulated in float (double for double
// inputs) through the deterministic two-level reduction of walk.cuh and written by the kernel as a 0-dim
// tensor; the mean's 1/numel (times the weight) is computed once on the host.

#include <limits>
#include <string_view>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/walk.cuh"

namespace fastpix2pix::gpu {
namespace {

using at::Tensor;

template <typename acc_t>
struct LossFinalizer {
  acc_t* loss;
  acc_t scale;  // weight / numel

  __device__ void operator()(int64_t, const typename Sum<acc_t, 1>::Lane& lane) const {
    *loss = lane.v[0] * scale;
  }
};

template <typename scalar_t, int kVec>
struct GanLossPass {
  static constexpr int kV = kVec;
  using acc_t = acc_type<scalar_t>;
  using Accumulator = SumAccumulator<acc_t, kV, 1>;
  using Reducer = typename Accumulator::Reducer;

  const scalar_t* logits;
  scalar_t* grad;  // null unless the gradient is wanted
  bool target_is_real;
  bool lsgan;
  acc_t grad_scale;  // 1 / numel
  LossFinalizer<acc_t> finalize;

  __device__ Vec<scalar_t, kV> load(int64_t offset) const { return load_vec<kV>(logits, offset); }

  __device__ void accumulate(Accumulator& acc, const Vec<scalar_t, kV>& in, int64_t offset) const {
    Vec<scalar_t, kV> result;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const acc_t x = static_cast<acc_t>(in.val[i]);
      acc_t loss;
      acc_t dloss;
      if (lsgan) {  // (x - t)^2
        const acc_t diff = x - (target_is_real ? acc_t(1) : acc_t(0));
        loss = diff * diff;
        dloss = acc_t(2) * diff;
      } else {
        // BCE with logits against t in {0, 1} is softplus(y), with y = x for t = 0 and y = -x for t = 1,
        // and its derivative in x is +-sigmoid(y). Both come from e = exp(-|y|), which cannot overflow, and
        // sigmoid(y) is never formed as 1 - sigmoid(-y), so small gradients keep their precision.
        const acc_t y = target_is_real ? -x : x;
        const acc_t e = device_exp(-device_abs(y));
        loss = (y > acc_t(0) ? y : acc_t(0)) + device_log1p(e);
        const acc_t sigmoid_y = (y >= acc_t(0) ? acc_t(1) : e) / (acc_t(1) + e);
        dloss = target_is_real ? -sigmoid_y : sigmoid_y;
      }
      acc.sum[0][i] += loss;
      result.val[i] = static_cast<scalar_t>(dloss * grad_scale);
    }
    if (grad != nullptr) {
      store_vec<kV>(grad, offset, result);
    }
  }
};

template <typename scalar_t, typename target_t, int kV>
struct PredAndTarget {
  Vec<scalar_t, kV> pred;
  Vec<target_t, kV> target;
};

// target_t is pred's dtype, or the accumulation type (a target of another dtype is converted to it first,
// as the reference does).
template <typename scalar_t, typename target_t, int kVec>
struct L1LossPass {
  static constexpr int kV = kVec;
  using acc_t = acc_type<scalar_t>;
  using Accumulator = SumAccumulator<acc_t, kV, 1>;
  using Reducer = typename Accumulator::Reducer;

  const scalar_t* pred;
  const target_t* target;
  scalar_t* grad;    // null unless the gradient is wanted
  acc_t grad_scale;  // weight / numel
  LossFinalizer<acc_t> finalize;

  __device__ PredAndTarget<scalar_t, target_t, kV> load(int64_t offset) const {
    return {load_vec<kV>(pred, offset), load_vec<kV>(target, offset)};
  }

  __device__ void accumulate(Accumulator& acc, const PredAndTarget<scalar_t, target_t, kV>& in,
                             int64_t offset) const {
    Vec<scalar_t, kV> result;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const acc_t diff = static_cast<acc_t>(in.pred.val[i]) - static_cast<acc_t>(in.target.val[i]);
      acc.sum[0][i] += device_abs(diff);
      // weight * sign(diff) / numel, with torch.sign's sign(0) = sign(NaN) = 0 (abs's derivative in PyTorch).
      const acc_t sign = diff > acc_t(0) ? acc_t(1) : (diff < acc_t(0) ? acc_t(-1) : acc_t(0));
      result.val[i] = static_cast<scalar_t>(sign * grad_scale);
    }
    if (grad != nullptr) {
      store_vec<kV>(grad, offset, result);
    }
  }
};

template <typename T>
struct TypeTag {
  using type = T;
};

// A dense version of `t` (any strides that cover its elements exactly once), to walk as a flat array.
Tensor dense(const Tensor& t) { return t.is_non_overlapping_and_dense() ? t : t.contiguous(); }

// `t` in `dtype` and in the memory order of `ref` (dense, same shape), copying (once) only when needed.
Tensor converted_in_memory_order_of(const Tensor& t, const Tensor& ref, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && same_memory_order(t, ref) && t.is_non_overlapping_and_dense()) {
    return t;
  }
  return at::empty_like(ref, ref.options().dtype(dtype)).copy_(t);
}

// The mean of nothing is NaN, as in PyTorch.
Tensor empty_mean(const Tensor& loss) { return loss.fill_(std::numeric_limits<double>::quiet_NaN()); }

// Whether `mode` names the least-squares loss ("lsgan") rather than "vanilla" (anything else is an error).
bool is_lsgan(c10::string_view mode, const char* op) {
  const bool lsgan = mode == "lsgan";
  TORCH_CHECK(lsgan || mode == "vanilla", op, ": mode must be \"vanilla\" or \"lsgan\", got \"",
              std::string(mode), "\"");
  return lsgan;
}

// The mean GAN loss of `logits` (dense, walked flat, not empty) into the one-element `loss`, and its gradient
// into `grad` (undefined unless wanted; dense in the memory order of the logits).
void launch_gan_loss(const Tensor& logits, const Tensor& grad, bool target_is_real, bool lsgan,
                     const Tensor& loss) {
  constexpr const char* op = "fastpix2pix::gan_loss";  // either op's: both checked the dtype before
  const int64_t numel = logits.numel();
  const bool compute_grad = grad.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t inv_numel = static_cast<acc_t>(1.0 / static_cast<double>(numel));
    const bool vectorize =
        flat_vectorizable(numel, vector_width<scalar_t>(), {&logits, compute_grad ? &grad : &logits});
    with_vector_width<scalar_t>(vectorize, [&](auto width) {
      constexpr int kV = decltype(width)::value;
      const GanLossPass<scalar_t, kV> pass{logits.const_data_ptr<scalar_t>(),
                                           compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr,
                                           target_is_real,
                                           lsgan,
                                           inv_numel,
                                           {loss.mutable_data_ptr<acc_t>(), inv_numel}};
      launch_flat_reduce(pass, numel, loss.options());
    });
  });
}

std::tuple<Tensor, Tensor> gan_loss(const Tensor& logits_in, bool target_is_real, c10::string_view mode,
                                    bool compute_grad) {
  constexpr const char* op = "fastpix2pix::gan_loss";
  check_cuda(logits_in, op, "logits");
  check_floating(logits_in, op, "logits");
  const bool lsgan = is_lsgan(mode, op);
  const DeviceGuard guard(logits_in.device());
  Tensor loss = at::empty({}, logits_in.options().dtype(stats_dtype(logits_in)));
  // The gradient has the strides of empty_like (as the fake kernel), and the logits are walked in the same.
  Tensor grad = compute_grad ? at::empty_like(logits_in) : Tensor();
  const Tensor logits = in_memory_order_of(logits_in, compute_grad ? grad : dense(logits_in));
  if (logits.numel() == 0) {
    return {empty_mean(loss), grad};
  }
  launch_gan_loss(logits, grad, target_is_real, lsgan, loss);
  return {loss, grad};
}

// gan_losses walks each group of the batch as one flat block of memory, which it is when the batch is the
// outermost dimension in memory (batch_outermost: always so in NCHW and channels_last). The gradient has
// empty_like's strides when they put the batch outermost, else it is contiguous (the fake kernel's rule); the
// logits are walked in the gradient's memory order, or without a gradient in their own when that will do.
Tensor grouped_grad(const Tensor& logits, int64_t groups) {
  Tensor grad = at::empty_like(logits);
  return groups == 1 || batch_outermost(grad) ? grad : at::empty(logits.sizes(), logits.options());
}

Tensor grouped_walk_order(const Tensor& logits, int64_t groups) {
  const Tensor walked = dense(logits);
  return groups == 1 || batch_outermost(walked) ? walked : walked.contiguous();
}

std::tuple<Tensor, Tensor> gan_losses(const Tensor& logits_in, const c10::List<bool>& targets_are_real,
                                      c10::string_view mode, bool compute_grad) {
  constexpr const char* op = "fastpix2pix::gan_losses";
  check_cuda(logits_in, op, "logits");
  check_floating(logits_in, op, "logits");
  const bool lsgan = is_lsgan(mode, op);
  const auto groups = static_cast<int64_t>(targets_are_real.size());
  check_loss_groups(logits_in, groups, op);
  const DeviceGuard guard(logits_in.device());
  Tensor losses = at::empty({groups}, logits_in.options().dtype(stats_dtype(logits_in)));
  Tensor grad = compute_grad ? grouped_grad(logits_in, groups) : Tensor();
  const Tensor logits =
      compute_grad ? in_memory_order_of(logits_in, grad) : grouped_walk_order(logits_in, groups);
  if (logits.numel() == 0) {  // every group is empty (they have one size)
    return {empty_mean(losses), grad};
  }
  for (int64_t g = 0; g < groups; ++g) {
    launch_gan_loss(batch_group(logits, groups, g), compute_grad ? batch_group(grad, groups, g) : Tensor(),
                    targets_are_real.get(g), lsgan, losses.narrow(0, g, 1));
  }
  return {losses, grad};
}

std::tuple<Tensor, Tensor> l1_loss(const Tensor& pred_in, const Tensor& target_in, double weight,
                                   bool compute_grad) {
  constexpr const char* op = "fastpix2pix::l1_loss";
  check_cuda(pred_in, op, "pred");
  check_floating(pred_in, op, "pred");
  TORCH_CHECK(target_in.defined(), op, ": target is undefined");
  check_same_shape(pred_in, target_in, op, "target");
  check_floating(target_in, op, "target");
  const DeviceGuard guard(pred_in.device());
  const auto acc_dtype = stats_dtype(pred_in);
  Tensor loss = at::empty({}, pred_in.options().dtype(acc_dtype));
  Tensor grad = compute_grad ? at::empty_like(pred_in) : Tensor();
  const Tensor like = compute_grad ? grad : dense(pred_in);
  const Tensor pred = in_memory_order_of(pred_in, like);
  // A target of another dtype is compared in the accumulation type, as the reference does.
  const bool same_dtype = target_in.scalar_type() == pred_in.scalar_type();
  const Tensor target =
      converted_in_memory_order_of(target_in, like, same_dtype ? pred_in.scalar_type() : acc_dtype);
  const int64_t numel = pred.numel();
  if (numel == 0) {
    return {empty_mean(loss), grad};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), op, [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(weight / static_cast<double>(numel));
    auto run = [&](auto target_tag) {
      using target_t = typename decltype(target_tag)::type;
      constexpr int64_t kWidest = sizeof(target_t) > sizeof(scalar_t) ? sizeof(target_t) : sizeof(scalar_t);
      const bool vectorize =
          flat_vectorizable(numel, vector_width<scalar_t>(), {&pred, &target, compute_grad ? &grad : &pred},
                            kWidest * vector_width<scalar_t>());
      with_vector_width<scalar_t>(vectorize, [&](auto width) {
        constexpr int kV = decltype(width)::value;
        const L1LossPass<scalar_t, target_t, kV> pass{
            pred.const_data_ptr<scalar_t>(),
            target.const_data_ptr<target_t>(),
            compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr,
            scale,
            {loss.mutable_data_ptr<acc_t>(), scale}};
        launch_flat_reduce(pass, numel, loss.options());
      });
    };
    if (same_dtype) {
      run(TypeTag<scalar_t>{});
    } else {
      run(TypeTag<acc_t>{});
    }
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpix2pix, CUDA, m) {
  m.impl("gan_loss", &gan_loss);
  m.impl("gan_losses", &gan_losses);
  m.impl("l1_loss", &l1_loss);
}

}  // namespace fastpix2pix::gpu
