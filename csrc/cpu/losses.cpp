// CPU kernels of the losses (schemas in fastpix2pix.cpp): the mean loss and its gradient in one read of the
// inputs. Elementwise, so any dense layout is walked flat in memory order, the gradient written with the
// input's strides (as empty_like gives them).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_kernel_utils.h"

namespace fastpix2pix::cpu {
namespace {

using at::Tensor;

// The mean over n elements of a per-element loss, whose terms(i, w) return the loss of vector i and, when
// `grad` is wanted, also store its gradient there.
template <typename Vec, typename Terms>
typename Vec::value_type mean_loss(int64_t n, const Terms& terms) {
  const double total = sum_per_channel<1>(flat_plan<Vec>(n), terms)[0][0];
  return static_cast<typename Vec::value_type>(total / double(n));  // NaN for no elements, as torch's losses
}

// Vanilla (BCE with logits against an all-0 or all-1 target) or LSGAN (MSE against it). For vanilla, with
// y = logits for a fake target and -logits for a real one, the loss is softplus(y) and its derivative in y
// sigmoid(y), both from e = exp(-|y|) so that nothing overflows at any |logits|.
template <typename scalar_t>
acc_t<scalar_t> gan_loss_kernel(const scalar_t* logits, scalar_t* grad, int64_t n, bool target_is_real,
                                bool vanilla) {
  using Vec = AccVec<scalar_t>;
  using acc = acc_t<scalar_t>;
  const acc dy_dx = target_is_real ? acc(-1) : acc(1);
  const Vec sign(dy_dx);
  // d(mean loss)/d(logits) = sigmoid(y) * dy_dx / n (vanilla) or 2 * (logits - target) / n (lsgan).
  const Vec grad_scale((vanilla ? dy_dx : acc(2)) / acc(n));
  const Vec target(target_is_real ? acc(1) : acc(0));
  const Vec zero(0), one(1);
  return mean_loss<Vec>(n, [&](int64_t i, int64_t w, auto) {
    const Vec x = load(logits + i, w);
    if (!vanilla) {
      const Vec diff = x - target;
      if (grad != nullptr) {
        store(grad + i, diff * grad_scale, w);
      }
      return std::array<Vec, 1>{diff * diff};
    }
    const Vec y = x * sign;
    const Vec e = (zero - y.abs()).exp();
    if (grad != nullptr) {
      const Vec r = (one + e).reciprocal();
      const Vec sigmoid = Vec::blendv(e * r, r, y >= zero);
      store(grad + i, sigmoid * grad_scale, w);
    }
    return std::array<Vec, 1>{at::vec::maximum(y, zero) + e.log1p()};
  });
}

// weight * mean|pred - target| and its gradient weight * sign(pred - target) / n.
template <typename scalar_t>
acc_t<scalar_t> l1_loss_kernel(const scalar_t* pred, const scalar_t* target, scalar_t* grad, int64_t n,
                               double weight) {
  using Vec = AccVec<scalar_t>;
  using acc = acc_t<scalar_t>;
  const Vec step(static_cast<acc>(weight) / acc(n));
  const Vec zero(0);
  const acc mean = mean_loss<Vec>(n, [&](int64_t i, int64_t w, auto) {
    const Vec diff = load(pred + i, w) - load(target + i, w);
    if (grad != nullptr) {
      store(grad + i, ((diff > zero) & step) - ((diff < zero) & step), w);
    }
    return std::array<Vec, 1>{diff.abs()};
  });
  return static_cast<acc>(weight) * mean;
}

std::tuple<Tensor, Tensor> gan_loss(const Tensor& logits, bool target_is_real, c10::string_view mode,
                                    bool compute_grad) {
  constexpr const char* op = "fastpix2pix::gan_loss";
  check_floating(logits, op, "logits");
  TORCH_CHECK(mode == "vanilla" || mode == "lsgan", op, ": mode must be \"vanilla\" or \"lsgan\", got \"",
              mode, "\"");
  // The gradient has empty_like's strides; the logits are walked in that same (dense) memory order.
  const Tensor grad = at::empty_like(logits);
  const Tensor input = in_memory_order_of(logits, grad);
  Tensor loss;
  FASTPIX2PIX_DISPATCH_FLOATING(logits.scalar_type(), op, [&] {
    scalar_t* grad_data = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const auto value = gan_loss_kernel<scalar_t>(input.const_data_ptr<scalar_t>(), grad_data, input.numel(),
                                                 target_is_real, mode == "vanilla");
    loss = at::scalar_tensor(value, logits.options().dtype(stats_dtype(logits)));
  });
  return {loss, compute_grad ? grad : Tensor()};
}

// The logits in the memory order their gradient is written in: empty_like's strides, or contiguous when the
// groups along dim 0 would not each be one block of memory there (batch_outermost).
std::pair<Tensor, Tensor> grouped_logits_and_grad(const Tensor& logits, int64_t groups) {
  Tensor grad = at::empty_like(logits);
  if (groups > 1 && !batch_outermost(grad)) {
    grad = at::empty(logits.sizes(), logits.options());
  }
  return {in_memory_order_of(logits, grad), grad};
}

std::tuple<Tensor, Tensor> gan_losses(const Tensor& logits, const c10::List<bool>& targets_are_real,
                                      c10::string_view mode, bool compute_grad) {
  constexpr const char* op = "fastpix2pix::gan_losses";
  check_floating(logits, op, "logits");
  TORCH_CHECK(mode == "vanilla" || mode == "lsgan", op, ": mode must be \"vanilla\" or \"lsgan\", got \"",
              mode, "\"");
  const int64_t groups = static_cast<int64_t>(targets_are_real.size());
  check_loss_groups(logits, groups, op);
  const auto [input, grad] = grouped_logits_and_grad(logits, groups);
  const int64_t per_group = input.numel() / groups;
  const Tensor losses = at::empty({groups}, logits.options().dtype(stats_dtype(logits)));
  FASTPIX2PIX_DISPATCH_FLOATING(logits.scalar_type(), op, [&] {
    using acc = acc_t<scalar_t>;
    acc* values = losses.mutable_data_ptr<acc>();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = g * per_group;
      scalar_t* grad_data = compute_grad ? grad.mutable_data_ptr<scalar_t>() + first : nullptr;
      values[g] = gan_loss_kernel<scalar_t>(input.const_data_ptr<scalar_t>() + first, grad_data, per_group,
                                            targets_are_real.get(g), mode == "vanilla");
    }
  });
  return {losses, compute_grad ? grad : Tensor()};
}

std::tuple<Tensor, Tensor> l1_loss(const Tensor& pred, const Tensor& target, double weight,
                                   bool compute_grad) {
  constexpr const char* op = "fastpix2pix::l1_loss";
  check_floating(pred, op, "pred");
  check_floating(target, op, "target");
  check_same_shape(pred, target, op, "target");
  // Mixed dtypes are compared in the accumulation type, as the reference does (a rare, copying path).
  const bool mixed = pred.scalar_type() != target.scalar_type();
  const Tensor p = mixed ? pred.to(stats_dtype(pred)) : pred;
  const Tensor grad = at::empty_like(p);
  const Tensor input = in_memory_order_of(p, grad);
  const Tensor reference = in_memory_order_of(mixed ? target.to(stats_dtype(pred)) : target, grad);
  Tensor loss;
  FASTPIX2PIX_DISPATCH_FLOATING(p.scalar_type(), op, [&] {
    scalar_t* grad_data = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const auto value =
        l1_loss_kernel<scalar_t>(input.const_data_ptr<scalar_t>(), reference.const_data_ptr<scalar_t>(),
                                 grad_data, input.numel(), weight);
    loss = at::scalar_tensor(value, pred.options().dtype(stats_dtype(pred)));
  });
  if (!compute_grad) {
    return {loss, Tensor()};
  }
  return {loss, mixed ? at::empty_like(pred).copy_(grad) : grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpix2pix, CPU, m) {
  m.impl("gan_loss", &gan_loss);
  m.impl("gan_losses", &gan_losses);
  m.impl("l1_loss", &l1_loss);
}

}  // namespace fastpix2pix::cpu
