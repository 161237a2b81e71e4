// Runs the CUDA kernels of csrc/cuda on the CPU, to test their logic where there is no GPU.
//
// Included before csrc/cuda's files, it turns the CUDA C++ dialect they use into plain C++ and provides the
// few runtime names of csrc/cuda/runtime.cuh. Blocks run one after another. The threads of a block are
// fibers (ucontext) on one OS thread: each runs until it reaches __syncthreads or returns, then the next;
// when all have, the next phase starts. The order within a phase is shuffled, so that a missing barrier
// (a thread reading what another writes in the same phase) shows as wrong results in some runs. Shared
// memory is one buffer, poisoned (0xFF bytes: NaN floats) before each block and checked for writes past
// the launch's dynamic size after it.
//
// What would fault on a GPU fails here too, with a C++ exception from the launch: a block of more threads
// than the kernels' launch bound (kBlockThreads, which every kernel of csrc/cuda declares in
// __launch_bounds__), too much shared memory, a bad grid, and a vector load or store at an address that is
// not a multiple of its size (x86 would do it silently). What this cannot show: timing, memory coalescing,
// the GPU's memory model beyond barriers, and code generation (tests/test_cuda_ops.py covers those on a GPU).
#pragma once

#define FASTPIX2PIX_CUDA_EMULATION 1

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <random>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};

template <typename T>
inline void __stwb(T* address, T value) {
  *address = value;
}

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace fastpix2pix::emulation {

inline dim3 thread_index;
inline dim3 block_index;
inline dim3 block_dim;
inline dim3 grid_dim;

inline int64_t sm_count = 2;  // small, so that tests see several blocks and partial states
inline int64_t launches = 0;

constexpr size_t kMaxSharedBytes = 48 * 1024;  // without cudaFuncSetAttribute, as the kernels are launched
constexpr unsigned char kPoison = 0xFF;
constexpr size_t kFiberStackBytes = 256 * 1024;

// The threads of the block being run, as fibers.
struct Fiber {
  ucontext_t context;
  dim3 index;
  bool done = false;
};

inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline std::vector<std::vector<char>> stacks;
inline Fiber* running = nullptr;
inline std::function<void()> block_body;
inline std::mt19937 shuffle_rng{12345};
inline std::exception_ptr failure;  // what a thread of the running block threw

inline void fiber_main() {
  // An exception must not unwind past the fiber's own stack (nothing there would catch it): it is kept
  // for the launch to rethrow on the caller's stack.
  try {
    block_body();
  } catch (...) {
    failure = std::current_exception();
  }
  running->done = true;  // returning resumes the scheduler (uc_link)
}

// Runs block_body on every thread of a block, phase by phase (a phase ends at __syncthreads), until all
// have returned or one has thrown; in that case the others are abandoned where they wait (kernels hold
// nothing that needs destroying) and the launch rethrows.
inline void run_block(dim3 block) {
  const size_t threads = size_t{block.x} * block.y * block.z;
  fibers.assign(threads, Fiber{});
  if (stacks.size() < threads) {
    stacks.resize(threads, std::vector<char>(kFiberStackBytes));
  }
  size_t i = 0;
  for (unsigned tz = 0; tz < block.z; ++tz) {
    for (unsigned ty = 0; ty < block.y; ++ty) {
      for (unsigned tx = 0; tx < block.x; ++tx, ++i) {
        Fiber& fiber = fibers[i];
        fiber.index = dim3(tx, ty, tz);
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = stacks[i].data();
        fiber.context.uc_stack.ss_size = stacks[i].size();
        fiber.context.uc_link = &scheduler;
        makecontext(&fiber.context, fiber_main, 0);
      }
    }
  }
  std::vector<size_t> order(threads);
  for (;;) {
    order.clear();
    for (size_t t = 0; t < threads; ++t) {
      if (!fibers[t].done) {
        order.push_back(t);
      }
    }
    if (order.empty()) {
      return;
    }
    std::shuffle(order.begin(), order.end(), shuffle_rng);
    for (const size_t t : order) {
      running = &fibers[t];
      thread_index = running->index;
      swapcontext(&scheduler, &running->context);
      if (failure) {
        return;
      }
    }
  }
}

// __syncthreads: this thread's phase ends; it resumes when every thread of the block has reached the
// barrier or returned (as exited threads no longer take part on the GPU).
inline void sync_threads() { swapcontext(&running->context, &scheduler); }

// A GPU faults on a vector access whose address is not a multiple of its size.
inline void check_aligned_access(const void* address, size_t bytes) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(address) % bytes == 0, "emulated kernel: misaligned ", bytes,
              "-byte vector access at address ", address, " (a GPU faults: misaligned address)");
}

}  // namespace fastpix2pix::emulation

#define threadIdx (::fastpix2pix::emulation::thread_index)
#define blockIdx (::fastpix2pix::emulation::block_index)
#define blockDim (::fastpix2pix::emulation::block_dim)
#define gridDim (::fastpix2pix::emulation::grid_dim)

inline void __syncthreads() { ::fastpix2pix::emulation::sync_threads(); }

#define FASTPIX2PIX_CHECK_ALIGNED_ACCESS(address, bytes) \
  ::fastpix2pix::emulation::check_aligned_access(address, bytes)

// The kernels' registrations compile (so that their signatures are checked) but register nothing: the
// emulation module exposes the op functions directly.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) \
  [[maybe_unused]] static void C10_ANONYMOUS_VARIABLE(unused_registration_)(torch::Library & m)

namespace fastpix2pix::gpu {

alignas(16) inline unsigned char block_shared_memory[emulation::kMaxSharedBytes];

}  // namespace fastpix2pix::gpu

// The kernels' building blocks, with the hooks above in place; launch_kernel reads their launch bound.
#include "cuda/device_utils.cuh"

namespace fastpix2pix::gpu {

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }

inline int64_t sm_count() { return emulation::sm_count; }

template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes,
                   const Args&... args) {
  namespace emu = emulation;
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  TORCH_CHECK(threads >= 1 && block.z <= 64, "emulated launch: bad block ", block.x, "x", block.y, "x",
              block.z);
  // Every kernel declares __launch_bounds__(kBlockThreads): a GPU refuses larger blocks of it.
  TORCH_CHECK(threads <= static_cast<uint64_t>(kBlockThreads), "emulated launch: a block of ", threads,
              " threads, above the kernels' launch bound of ", kBlockThreads);
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 &&
                  grid.z <= 65535,
              "emulated launch: bad grid ", grid.x, "x", grid.y, "x", grid.z);
  TORCH_CHECK(shared_bytes <= emu::kMaxSharedBytes, "emulated launch: ", shared_bytes,
              " bytes of shared memory");
  ++emu::launches;
  emu::grid_dim = grid;
  emu::block_dim = block;
  emu::block_body = [&] { kernel(args...); };
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(block_shared_memory, emu::kPoison, sizeof(block_shared_memory));
        emu::block_index = dim3(bx, by, bz);
        emu::run_block(block);
        if (emu::failure) {
          std::rethrow_exception(std::exchange(emu::failure, nullptr));
        }
        for (size_t i = shared_bytes; i < sizeof(block_shared_memory); ++i) {
          TORCH_CHECK(block_shared_memory[i] == emu::kPoison,
                      "emulated launch: shared memory written at byte ", i, " past the launch's ",
                      shared_bytes);
        }
      }
    }
  }
}

}  // namespace fastpix2pix::gpu
