// The CUDA runtime as the kernels' host code sees it: the device guard, the multiprocessor count and the
// checked kernel launch on the current stream. Everything else in csrc/cuda is plain C++ and CUDA C++
// kernel code, so that tests/cuda_emulation can run the very same kernels on the CPU by providing these
// few names itself (it defines FASTPIX2PIX_CUDA_EMULATION; see tests/cuda_emulation/emulation.h).
#pragma once

#ifndef FASTPIX2PIX_CUDA_EMULATION

#include <array>
#include <atomic>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace fastpix2pix::gpu {

// Makes the input's device current for the op (allocations, the current stream, launches).
using DeviceGuard = c10::cuda::CUDAGuard;

// Whether a tensor is on the device these kernels run on.
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }

// The current device's multiprocessor count, asked once per device. (Through the runtime rather than
// ATen/cuda/CUDAContext.h, whose cuBLAS/cuSPARSE headers a minimal toolkit lacks.)
inline int64_t sm_count() {
  static std::array<std::atomic<int>, 64> cached{};
  const c10::DeviceIndex device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < static_cast<c10::DeviceIndex>(cached.size()),
              "fastpix2pix: device index ", static_cast<int>(device), " out of range");
  int count = cached[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cached[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// kernel<<<grid, block, shared_bytes, current stream>>>(args...), then the launch's error check. The current
// stream is what torch.compile and CUDA graph capture expect work to go to.
template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes,
                   const Args&... args) {
  kernel<<<grid, block, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastpix2pix::gpu

#endif  // FASTPIX2PIX_CUDA_EMULATION
