// CUDA kernel of adam_master_step_ (schema and semantics: fastpix2pix.cpp; the CPU kernel: cpu/adam.cpp):
// Adam on float32 master weights from low-precision gradients, writing the low-precision copies. One launch
// updates up to kTensorsPerLaunch weights (blockIdx.y picks the weight, the x blocks stride over it), with
// the pointers passed by value as kernel parameters, so a CUDA graph replays it as it was captured. The
// learning rate and the step counts are read on the device; the steps are incremented after the update by
// one foreach add, as torch's capturable Adam does.

#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cuda/walk.cuh"

namespace fastpix2pix::gpu {
namespace {

using at::Tensor;

// 32 entries of 56 bytes: 1.8 KB of kernel parameters, within the 4 KB every CUDA version allows.
constexpr int kTensorsPerLaunch = 32;

template <typename grad_t>
struct AdamEntry {
  float* param;
  const grad_t* grad;
  float* exp_avg;
  float* exp_avg_sq;
  grad_t* copy;
  const float* step;  // the count before this update
  int64_t numel;
};

template <typename grad_t>
struct AdamBatch {
  AdamEntry<grad_t> entries[kTensorsPerLaunch];
};

// Computed on the host in double and rounded once, as the reference's Python scalars are (1 - beta2 in float
// arithmetic would be off by 1.3e-5 of itself for beta2 = 0.999).
struct AdamConstants {
  double beta1;
  double beta2;
  float one_minus_beta1;
  float beta2_f;
  float one_minus_beta2;
  float weight_decay;
  float eps;
};

template <typename grad_t>
__global__ void __launch_bounds__(kBlockThreads)
    adam_master_kernel(AdamBatch<grad_t> batch, const float* lr, AdamConstants c) {
  const AdamEntry<grad_t>& e = batch.entries[blockIdx.y];
  // The bias corrections in double (once per thread): 1 - beta^step loses digits in float.
  const double step = static_cast<double>(*e.step) + 1.0;
  const float step_size = static_cast<float>(static_cast<double>(*lr) / (1.0 - pow(c.beta1, step)));
  const float bias2_sqrt = static_cast<float>(sqrt(1.0 - pow(c.beta2, step)));
  const float one_minus_beta1 = c.one_minus_beta1;
  const float one_minus_beta2 = c.one_minus_beta2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < e.numel; i += stride) {
    float g = static_cast<float>(e.grad[i]);
    float p = e.param[i];
    if (c.weight_decay != 0.0f) {
      g += c.weight_decay * p;
    }
    float m = e.exp_avg[i];
    m = m + (g - m) * one_minus_beta1;  // lerp towards the gradient, as Adam's exp_avg.lerp_
    const float v = e.exp_avg_sq[i] * c.beta2_f + g * g * one_minus_beta2;
    p -= step_size * m / (sqrtf(v) / bias2_sqrt + c.eps);
    e.param[i] = p;
    e.exp_avg[i] = m;
    e.exp_avg_sq[i] = v;
    e.copy[i] = static_cast<grad_t>(p);
  }
}

template <typename grad_t>
void launch_adam(const std::vector<size_t>& indices, at::TensorList params, const std::vector<Tensor>& grads,
                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList copies,
                 at::TensorList steps, const Tensor& lr, const AdamConstants& constants) {
  for (size_t first = 0; first < indices.size(); first += kTensorsPerLaunch) {
    const size_t count = std::min<size_t>(kTensorsPerLaunch, indices.size() - first);
    AdamBatch<grad_t> batch{};
    int64_t largest = 1;
    for (size_t k = 0; k < count; ++k) {
      const size_t i = indices[first + k];
      batch.entries[k] = {params[i].mutable_data_ptr<float>(),  grads[i].const_data_ptr<grad_t>(),
                          exp_avgs[i].mutable_data_ptr<float>(), exp_avg_sqs[i].mutable_data_ptr<float>(),
                          copies[i].mutable_data_ptr<grad_t>(), steps[i].const_data_ptr<float>(),
                          params[i].numel()};
      largest = std::max(largest, params[i].numel());
    }
    const int64_t blocks = std::min(ceil_div(largest, kBlockThreads), sm_count() * kMapBlocksPerSm);
    launch_kernel(adam_master_kernel<grad_t>, grid_of(blocks, static_cast<int64_t>(count)), dim3(kBlockThreads),
                  0, batch, lr.const_data_ptr<float>(), constants);
  }
}

void adam_master_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList copies, at::TensorList steps, const Tensor& lr,
                       double beta1, double beta2, double weight_decay, double eps) {
  constexpr const char* op = "fastpix2pix::adam_master_step_";
  if (params.empty()) {
    return;
  }
  check_cuda(params[0], op, "params[0]");
  check_adam_master_args(params, grads, exp_avgs, exp_avg_sqs, copies, steps, lr, params[0].device());
  const DeviceGuard guard(params[0].device());
  std::vector<Tensor> laid_out;
  laid_out.reserve(params.size());
  std::vector<size_t> by_dtype[3];  // bfloat16, float16, float32 copies
  for (size_t i = 0; i < params.size(); ++i) {
    laid_out.push_back(in_layout_of(grads[i], params[i]));
    const auto dtype = copies[i].scalar_type();
    if (params[i].numel() > 0) {
      by_dtype[dtype == at::kBFloat16 ? 0 : dtype == at::kHalf ? 1 : 2].push_back(i);
    }
  }
  const AdamConstants constants{beta1,
                                beta2,
                                static_cast<float>(1.0 - beta1),
                                static_cast<float>(beta2),
                                static_cast<float>(1.0 - beta2),
                                static_cast<float>(weight_decay),
                                static_cast<float>(eps)};
  launch_adam<c10::BFloat16>(by_dtype[0], params, laid_out, exp_avgs, exp_avg_sqs, copies, steps, lr, constants);
  launch_adam<c10::Half>(by_dtype[1], params, laid_out, exp_avgs, exp_avg_sqs, copies, steps, lr, constants);
  launch_adam<float>(by_dtype[2], params, laid_out, exp_avgs, exp_avg_sqs, copies, steps, lr, constants);
  at::_foreach_add_(steps, 1);  // after the launches, which read the counts before it
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpix2pix, CUDA, m) { m.impl("adam_master_step_", &adam_master_step_); }

}  // namespace fastpix2pix::gpu
