// The CUDA ops of csrc/cuda compiled for the CPU emulation of emulation.h, exposed as a Python module (built
// by tests/test_cuda_emulation.py). The op functions are those of the CUDA library, called directly.
#include "emulation.h"

#include <torch/extension.h>

#include "cuda/adam.cu"
#include "cuda/bias_act.cu"
#include "cuda/bn_act.cu"
#include "cuda/concat.cu"
#include "cuda/losses.cu"

namespace fastpix2pix::emulation_tests {

// One 16-byte vector of floats per thread, read at in + in_offset and written at out + out_offset: a test
// of the emulation's own checks (misaligned for offsets that are not multiples of 4, oversized blocks).
__global__ void __launch_bounds__(gpu::kBlockThreads)
    copy_vectors_kernel(const float* in, int64_t in_offset, float* out, int64_t out_offset) {
  const int64_t offset = static_cast<int64_t>(threadIdx.x) * 4;
  gpu::store_vec<4>(out + out_offset, offset, gpu::load_vec<4>(in + in_offset, offset));
}

void copy_vectors(const at::Tensor& in, int64_t in_offset, const at::Tensor& out, int64_t out_offset,
                  int64_t threads) {
  TORCH_CHECK(in.is_contiguous() && in.scalar_type() == at::kFloat && out.is_contiguous() &&
              out.scalar_type() == at::kFloat);
  TORCH_CHECK(in_offset + threads * 4 <= in.numel() && out_offset + threads * 4 <= out.numel());
  gpu::launch_kernel(copy_vectors_kernel, dim3(1), dim3(static_cast<unsigned>(threads)), 0,
                     in.const_data_ptr<float>(), in_offset, out.mutable_data_ptr<float>(), out_offset);
}

}  // namespace fastpix2pix::emulation_tests

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace gpu = fastpix2pix::gpu;
  // The BatchNorm ops with the schema's default groups=1 (fastpix2pix.cpp), so that one call site serves both
  // this module and torch.ops.fastpix2pix; pybind then wants every argument named.
  using py::arg;
  m.def("bn_stats", &gpu::bn_stats, arg("x"), arg("groups") = 1);
  m.def("bn_act_forward", &gpu::bn_act_forward, arg("x"), arg("mean"), arg("var"), arg("weight"), arg("bias"),
        arg("eps"), arg("negative_slope"), arg("groups") = 1);
  m.def("bn_act_backward_reduce", &gpu::bn_act_backward_reduce, arg("grad_out"), arg("x"), arg("mean"),
        arg("var"), arg("weight"), arg("bias"), arg("eps"), arg("negative_slope"), arg("groups") = 1);
  m.def("bn_act_backward_apply", &gpu::bn_act_backward_apply, arg("grad_out"), arg("x"), arg("mean"),
        arg("var"), arg("weight"), arg("bias"), arg("sum_dz"), arg("sum_dz_xhat"), arg("count"), arg("eps"),
        arg("negative_slope"), arg("training"), arg("groups") = 1);
  m.def("bias_act_forward", &gpu::bias_act_forward);
  m.def("bias_act_backward", &gpu::bias_act_backward);
  m.def("gan_loss",
        [](const at::Tensor& logits, bool target_is_real, const std::string& mode, bool compute_grad) {
          return gpu::gan_loss(logits, target_is_real, mode, compute_grad);
        });
  // bool[] is a c10::List<bool> in the op's signature; std::vector<bool> is what pybind converts a list to.
  m.def("gan_losses", [](const at::Tensor& logits, const std::vector<bool>& targets_are_real,
                         const std::string& mode, bool compute_grad) {
    c10::List<bool> targets;
    for (const bool target : targets_are_real) {
      targets.push_back(target);
    }
    return gpu::gan_losses(logits, targets, mode, compute_grad);
  });
  m.def("l1_loss", &gpu::l1_loss);
  m.def("relu_cat", &gpu::relu_cat);
  m.def("relu_cat_backward", &gpu::relu_cat_backward);
  m.def("adam_master_step_",
        [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
           const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
           const std::vector<at::Tensor>& copies, const std::vector<at::Tensor>& steps, const at::Tensor& lr,
           double beta1, double beta2, double weight_decay, double eps) {
          gpu::adam_master_step_(params, grads, exp_avgs, exp_avg_sqs, copies, steps, lr, beta1, beta2,
                                 weight_decay, eps);
        });
  m.def("set_sm_count", [](int64_t count) { fastpix2pix::emulation::sm_count = count; });
  m.def("launches", [] { return fastpix2pix::emulation::launches; });
  m.def("block_threads", [] { return gpu::kBlockThreads; });
  m.def("copy_vectors", &fastpix2pix::emulation_tests::copy_vectors);
}
