// Adam on float32 master weights from low-precision gradients, writing the low-precision copy the next
// forward computes with: one pass per tensor reads the gradient (bfloat16 or float16, or float32), the
// master weight and both moments, and writes the weight, the moments and the copy. It replaces, per weight
// and iteration, the forward's cast of the weight to bfloat16, the backward's cast of its gradient to float32
// and a separate Adam pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "cpu_kernel_utils.h"

namespace fastpix2pix::cpu {
namespace {

constexpr const char* kOp = "adam_master_step_";

struct AdamHyper {
  float lr_over_bias1;   // lr / (1 - beta1^step)
  float bias2_sqrt;      // sqrt(1 - beta2^step)
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float weight_decay;
  float eps;
};

AdamHyper hyper_for_step(double step, double lr, double beta1, double beta2, double weight_decay, double eps) {
  const double bias1 = 1.0 - std::pow(beta1, step);
  const double bias2 = 1.0 - std::pow(beta2, step);
  return {static_cast<float>(lr / bias1), static_cast<float>(std::sqrt(bias2)), static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2),      static_cast<float>(1.0 - beta2),      static_cast<float>(weight_decay),
          static_cast<float>(eps)};
}

// The update of torch.optim.Adam (amsgrad off, not maximizing): the first moment as a lerp towards the
// gradient, the second as beta2 * v + (1 - beta2) * g^2, the step lr / bias1 * m / (sqrt(v) / sqrt(bias2) + eps).
template <typename grad_t>
void adam_one(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
              const at::Tensor& exp_avg_sq, const at::Tensor& copy, const AdamHyper& h) {
  using Vec = at::vec::Vectorized<float>;
  float* p = param.data_ptr<float>();
  const grad_t* g = grad.const_data_ptr<grad_t>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  grad_t* c = copy.data_ptr<grad_t>();
  const Vec lr_over_bias1(h.lr_over_bias1), bias2_sqrt(h.bias2_sqrt), one_minus_beta1(h.one_minus_beta1);
  const Vec beta2(h.beta2), one_minus_beta2(h.one_minus_beta2), weight_decay(h.weight_decay), eps(h.eps);
  const bool decay = h.weight_decay != 0.0f;
  at::parallel_for(0, param.numel(), 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += Vec::size()) {
      const int64_t width = std::min<int64_t>(Vec::size(), end - i);
      Vec gv = load(g + i, width);
      Vec pv = load(p + i, width);
      if (decay) {
        gv = gv + pv * weight_decay;
      }
      Vec mv = load(m + i, width);
      mv = mv + (gv - mv) * one_minus_beta1;
      const Vec vv = load(v + i, width) * beta2 + gv * gv * one_minus_beta2;
      pv = pv - lr_over_bias1 * mv / (vv.sqrt() / bias2_sqrt + eps);
      store(p + i, pv, width);
      store(m + i, mv, width);
      store(v + i, vv, width);
      store(c + i, pv, width);
    }
  });
}

void check_entry(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                 const at::Tensor& exp_avg_sq, const at::Tensor& copy, const at::Tensor& step, size_t i) {
  TORCH_CHECK(param.scalar_type() == at::kFloat, kOp, ": params[", i, "] must be float32, got ",
              param.scalar_type());
  TORCH_CHECK(param.is_non_overlapping_and_dense(), kOp, ": params[", i, "] must be dense");
  TORCH_CHECK(exp_avg.scalar_type() == at::kFloat && exp_avg_sq.scalar_type() == at::kFloat, kOp,
              ": the moments of params[", i, "] must be float32");
  TORCH_CHECK(grad.scalar_type() == copy.scalar_type(), kOp, ": grads[", i, "] (", grad.scalar_type(),
              ") and copies[", i, "] (", copy.scalar_type(), ") must have one dtype");
  const auto dtype = copy.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat, kOp, ": copies[", i,
              "] must be bfloat16, float16 or float32, got ", dtype);
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq, &copy}) {
    check_same_shape(param, *t, kOp, "a moment or copy");
    TORCH_CHECK(t->strides() == param.strides(), kOp, ": the moments and copy of params[", i,
                "] must have its strides");
  }
  check_same_shape(param, grad, kOp, "grad");
  TORCH_CHECK(step.numel() == 1 && step.is_cpu(), kOp, ": steps[", i, "] must be a one-element CPU tensor");
}

void adam_master_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList copies, at::TensorList steps, double lr,
                       double beta1, double beta2, double weight_decay, double eps) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && copies.size() == n &&
                  steps.size() == n,
              kOp, ": params, grads, exp_avgs, exp_avg_sqs, copies and steps must have one length");
  for (size_t i = 0; i < n; ++i) {
    check_entry(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], copies[i], steps[i], i);
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    // A gradient in another layout (a conv backward may return one) is laid out as the weight first.
    const at::Tensor grad = grads[i].strides() == param.strides()
                                ? grads[i]
                                : at::empty_like(param, grads[i].options()).copy_(grads[i]);
    at::Tensor step = steps[i];
    step.add_(1);
    const AdamHyper h = hyper_for_step(step.item<double>(), lr, beta1, beta2, weight_decay, eps);
    switch (copies[i].scalar_type()) {
      case at::kBFloat16:
        adam_one<c10::BFloat16>(param, grad, exp_avgs[i], exp_avg_sqs[i], copies[i], h);
        break;
      case at::kHalf:
        adam_one<c10::Half>(param, grad, exp_avgs[i], exp_avg_sqs[i], copies[i], h);
        break;
      default:
        adam_one<float>(param, grad, exp_avgs[i], exp_avg_sqs[i], copies[i], h);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpix2pix, CPU, m) { m.impl("adam_master_step_", &adam_master_step_); }

}  // namespace fastpix2pix::cpu
