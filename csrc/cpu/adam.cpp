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

void adam_master_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList copies, at::TensorList steps,
                       const at::Tensor& lr, double beta1, double beta2, double weight_decay, double eps) {
  check_adam_master_args(params, grads, exp_avgs, exp_avg_sqs, copies, steps, lr, c10::Device(c10::kCPU));
  const double rate = lr.item<double>();
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    const at::Tensor grad = in_layout_of(grads[i], param);
    at::Tensor step = steps[i];
    step.add_(1);
    const AdamHyper h = hyper_for_step(step.item<double>(), rate, beta1, beta2, weight_decay, eps);
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
