// The CUDA ops of csrc/cuda compiled for the CPU emulation of emulation.h, exposed as a Python module (built
// by tests/test_cuda_emulation.py). The op functions are those of the CUDA library, called directly.
#include "emulation.h"

#include <torch/extension.h>

#include "cuda/bias_act.cu"
#include "cuda/bn_act.cu"
#include "cuda/losses.cu"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace gpu = fastpix2pix::gpu;
  m.def("bn_stats", &gpu::bn_stats);
  m.def("bn_act_forward", &gpu::bn_act_forward);
  m.def("bn_act_backward_reduce", &gpu::bn_act_backward_reduce);
  m.def("bn_act_backward_apply", &gpu::bn_act_backward_apply);
  m.def("bias_act_forward", &gpu::bias_act_forward);
  m.def("bias_act_backward", &gpu::bias_act_backward);
  m.def("gan_loss",
        [](const at::Tensor& logits, bool target_is_real, const std::string& mode, bool compute_grad) {
          return gpu::gan_loss(logits, target_is_real, mode, compute_grad);
        });
  m.def("l1_loss", &gpu::l1_loss);
  m.def("set_sm_count", [](int64_t count) { fastpix2pix::emulation::sm_count = count; });
  m.def("launches", [] { return fastpix2pix::emulation::launches; });
}
