// Runs the CUDA kernels of csrc/cuda on the CPU, to test their logic where there is no GPU.
//
// Included before csrc/cuda's files, it turns the CUDA C++ dialect they use into plain C++ and provides the
// few runtime names of csrc/cuda/runtime.cuh. Blocks run one after another. The threads of a block are
// fibers (ucontext) on one OS thread: each runs until it reaches __syncthreads or returns, then the next;
// when all have, the next phase starts. The order within a phase is shuffled, so that a missing barrier
// (a thread reading what another writes in the same phase) shows as wrong results in some runs. Shared
// memory is one buffer, poisoned (0xFF bytes: NaN floats) before each block and checked for writes past
// the launch's dynamic size after it. Launch limits (threads per block, shared bytes, grid sizes) are
// checked as the GPU would. What this cannot show: timing, memory coalescing, the GPU's memory model beyond
// barriers, and code generation (tests/test_cuda_ops.py covers those on a GPU).
#pragma once

#define FASTPIX2PIX_CUDA_EMULATION 1

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
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

inline void fiber_main() {
  block_body();
  running->done = true;  // returning resumes the scheduler (uc_link)
}

// Runs block_body on every thread of a block, phase by phase (a phase ends at __syncthreads).
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
    }
  }
}

// __syncthreads: this thread's phase ends; it resumes when every thread of the block has reached the
// barrier or returned (as exited threads no longer take part on the GPU).
inline void sync_threads() { swapcontext(&running->context, &scheduler); }

}  // namespace fastpix2pix::emulation

#define threadIdx (::fastpix2pix::emulation::thread_index)
#define blockIdx (::fastpix2pix::emulation::block_index)
#define blockDim (::fastpix2pix::emulation::block_dim)
#define gridDim (::fastpix2pix::emulation::grid_dim)

inline void __syncthreads() { ::fastpix2pix::emulation::sync_threads(); }

// The kernels' registrations compile (so that their signatures are checked) but register nothing: the
// emulation module exposes the op functions directly.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) \
  [[maybe_unused]] static void C10_ANONYMOUS_VARIABLE(unused_registration_)(torch::Library & m)

namespace fastpix2pix::gpu {

alignas(16) inline unsigned char block_shared_memory[emulation::kMaxSharedBytes];

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
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.z <= 64, "emulated launch: bad block ", block.x, "x",
              block.y, "x", block.z);
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
