// A small host-side SIMT emulation: compiles the CUDA kernels of csrc/cuda/*.cuh with g++ and
// runs them on the CPU, so that CI without a GPU checks the kernels' indexing, tiling, barriers
// and warp exchanges against the reference. Tests only; never a fast path.
//
// What it provides (the subset the kernels are written in):
//   threadIdx / blockIdx / blockDim / gridDim (thread-locals, set per emulated thread),
//   __syncthreads() (a real block barrier), __syncwarp(), __shfl_sync / __shfl_xor_sync /
//   __shfl_down_sync (real warp exchanges), dynamic shared memory per block, and a launch helper
//   replacing kernel<<<grid, block, smem, stream>>>(args) (GSA_LAUNCH in csrc/cuda/).
// How: the blocks of a grid run one after another; the threads of a block run as cooperative
// fibers on the calling OS thread (a small stack switch on x86-64, ucontext elsewhere). A fiber
// runs until it reaches a barrier or a shuffle, then the next fiber runs; the last fiber to
// arrive releases the others and runs on ahead. So a thread that reads shared memory without a barrier after other threads' writes sees
// stale data, and a thread that overwrites a tile without a barrier after others' reads corrupts
// them: missing barriers give wrong answers instead of passing by luck. Shared memory is filled
// with 0xFF bytes (NaN for floats) before every block, so reading unwritten shared memory shows.
// Errors that CUDA would hang on or leave undefined are reported as exceptions: a barrier that
// not every thread reaches (deadlock), threads of a block waiting at different __syncthreads()
// lines, a shuffle with a partial mask or an out-of-warp source lane, too many threads, or more
// dynamic shared memory than the 48 KiB a launch gets without opt-in.
// Not covered: timing, memory coalescing, bank conflicts, races between blocks (blocks never
// overlap here), races inside a warp between shuffles (lanes of a warp are not lock-stepped),
// and device-specific float behaviour (fused multiply-add contraction, fast-math intrinsics).
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#define GSA_SIMT_EMULATION 1

namespace gsa::emu {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kSharedMemoryLimit = 48 * 1024;  // per block without cudaFuncSetAttribute opt-in
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kFiberStackBytes = 64 * 1024;

class Block;
inline thread_local Block* current_block = nullptr;

// ---- fiber contexts: switch(save, load) stores the running context in save, resumes load ----
#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save,
// switches to the stack `load` and restores its registers (a few ns; swapcontext makes a
// signal-mask system call on every switch, which made the emulation over 10x slower).
__attribute__((naked, noinline)) static void switch_stack(void** /*save*/, void* /*load*/) {
  asm volatile(
      "pushq %rbp\n pushq %rbx\n pushq %r12\n pushq %r13\n pushq %r14\n pushq %r15\n"
      "movq %rsp, (%rdi)\n movq %rsi, %rsp\n"
      "popq %r15\n popq %r14\n popq %r13\n popq %r12\n popq %rbx\n popq %rbp\n ret\n");
}
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& save, Context& load) { switch_stack(&save.sp, load.sp); }
// A context that starts entry() on the given stack: six zero registers, then entry as the
// return address, aligned as if entry had been called.
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  auto* slots = reinterpret_cast<void**>(top);
  slots[-1] = nullptr;  // entry's (never used) return address
  slots[-2] = reinterpret_cast<void*>(entry);
  for (int k = 3; k <= 8; ++k) slots[-k] = nullptr;
  c.sp = &slots[-8];
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// One thread block: its fibers, its barrier state and its shared memory.
class Block {
 public:
  Block(dim3 block, size_t smem_bytes)
      : n_(block.x * block.y * block.z),
        smem_bytes_(smem_bytes),
        smem_(new unsigned char[smem_bytes > 0 ? smem_bytes : 1]),
        stacks_(new char[n_ * kFiberStackBytes]),
        fibers_(n_),
        warps_((n_ + kWarpSize - 1) / kWarpSize) {
    for (unsigned i = 0; i < n_; ++i) {
      Fiber& f = fibers_[i];
      f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
      f.lane = static_cast<int>(i % kWarpSize);
      f.warp = static_cast<int>(i / kWarpSize);
    }
    for (size_t w = 0; w < warps_.size(); ++w)
      warps_[w].size = static_cast<int>(std::min<size_t>(kWarpSize, n_ - w * kWarpSize));
  }

  // Runs body() once per thread of the block at the current blockIdx.
  void run(void (*body)(void*), void* arg) {
    body_ = body;
    arg_ = arg;
    std::memset(smem_.get(), 0xFF, smem_bytes_);
    barrier_arrived_ = 0;
    barrier_line_ = -1;
    for (auto& w : warps_) w.arrived = 0;
    for (unsigned i = 0; i < n_; ++i) {
      Fiber& f = fibers_[i];
      f.state = kRunnable;
      f.shuffles = 0;
      make_context(f.ctx, stacks_.get() + i * kFiberStackBytes, kFiberStackBytes, &Block::entry);
    }
    Block* outer = current_block;
    current_block = this;
    unsigned done = 0;
    bool reverse = false;
    while (done < n_) {
      bool ran = false;
      // alternate the sweep direction so that no thread order is privileged
      for (unsigned k = 0; k < n_; ++k) {
        unsigned i = reverse ? n_ - 1 - k : k;
        if (fibers_[i].state != kRunnable) continue;
        current_ = i;
        threadIdx = fibers_[i].tid;
        switch_context(scheduler_, fibers_[i].ctx);
        ran = true;
        if (!error_.empty()) {
          current_block = outer;
          throw std::runtime_error("SIMT emulation: " + error_);
        }
        if (fibers_[i].state == kDone) ++done;
      }
      reverse = !reverse;
      if (!ran) {
        current_block = outer;
        throw std::runtime_error("SIMT emulation: deadlock: " + describe_waiters());
      }
    }
    current_block = outer;
  }

  void syncthreads(int line) {
    if (barrier_arrived_ > 0 && barrier_line_ != line)
      fail("threads of block " + block_str() + " wait at different __syncthreads() (lines " +
           std::to_string(barrier_line_) + " and " + std::to_string(line) + ")");
    barrier_line_ = line;
    if (++barrier_arrived_ == n_) {
      barrier_arrived_ = 0;
      barrier_line_ = -1;
      for (auto& f : fibers_)
        if (f.state == kWaitBlock) f.state = kRunnable;
      return;  // the last thread to arrive runs on ahead
    }
    wait(kWaitBlock);
  }

  void syncwarp() {
    Fiber& f = fibers_[current_];
    Warp& w = warps_[f.warp];
    if (++w.arrived == w.size) {
      w.arrived = 0;
      for (int l = 0; l < w.size; ++l) {
        Fiber& g = fibers_[f.warp * kWarpSize + l];
        if (g.state == kWaitWarp) g.state = kRunnable;
      }
      return;
    }
    wait(kWaitWarp);
  }

  // Every lane publishes `bits`, waits for its whole warp, and reads lane `src`'s value. Two
  // slot sets alternate, so a lane that runs ahead into the next shuffle cannot overwrite a
  // value a slower lane has yet to read (it would first need that lane at the next barrier).
  uint64_t exchange(uint64_t bits, int src) {
    Fiber& f = fibers_[current_];
    Warp& w = warps_[f.warp];
    if (src < 0 || src >= w.size) fail("shuffle reads lane " + std::to_string(src) + " outside the warp");
    const unsigned slot = f.shuffles++ & 1u;
    w.slots[slot][f.lane] = bits;
    syncwarp();
    return w.slots[slot][src];
  }

  int lane() const { return fibers_[current_].lane; }
  unsigned char* shared_memory() { return smem_.get(); }

  void fail(const std::string& msg) {
    if (error_.empty()) error_ = msg;
    switch_context(fibers_[current_].ctx, scheduler_);  // never resumed: the launch throws
  }

 private:
  enum State { kRunnable, kWaitBlock, kWaitWarp, kDone };
  struct Fiber {
    Context ctx;
    dim3 tid;
    int lane = 0, warp = 0;
    State state = kRunnable;
    unsigned shuffles = 0;
  };
  struct Warp {
    int size = 0, arrived = 0;
    uint64_t slots[2][kWarpSize] = {};
  };

  static void entry() {
    Block* b = current_block;
    b->body_(b->arg_);
    b->fibers_[b->current_].state = kDone;
    switch_context(b->fibers_[b->current_].ctx, b->scheduler_);
  }

  void wait(State s) {
    fibers_[current_].state = s;
    switch_context(fibers_[current_].ctx, scheduler_);
  }

  std::string block_str() const {
    return "(" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
           std::to_string(blockIdx.z) + ")";
  }

  std::string describe_waiters() const {
    unsigned at_block = 0, at_warp = 0, finished = 0;
    for (const auto& f : fibers_) {
      at_block += f.state == kWaitBlock;
      at_warp += f.state == kWaitWarp;
      finished += f.state == kDone;
    }
    return "in block " + block_str() + ", " + std::to_string(at_block) + " threads wait at __syncthreads(), " +
           std::to_string(at_warp) + " at a warp exchange, " + std::to_string(finished) +
           " have exited (a barrier not reached by every thread)";
  }

  unsigned n_;
  size_t smem_bytes_;
  std::unique_ptr<unsigned char[]> smem_;
  std::unique_ptr<char[]> stacks_;
  std::vector<Fiber> fibers_;
  std::vector<Warp> warps_;
  Context scheduler_;
  unsigned current_ = 0;
  unsigned barrier_arrived_ = 0;
  int barrier_line_ = -1;
  void (*body_)(void*) = nullptr;
  void* arg_ = nullptr;
  std::string error_;
};

inline Block& block() {
  if (current_block == nullptr) throw std::runtime_error("SIMT emulation: device function called outside a launch");
  return *current_block;
}

inline unsigned char* dynamic_shared_memory() { return block().shared_memory(); }

inline void syncthreads(int line) { block().syncthreads(line); }

template <typename T>
T shuffle(unsigned mask, T v, int src) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t));
  if (mask != kFullMask) block().fail("only full-warp shuffles (mask 0xffffffff) are emulated");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = block().exchange(bits, src);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Replaces kernel<<<grid, block, smem, stream>>>(args...): every block, one after another.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, void* /*stream*/,
            Args&&... args) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock)
    throw std::runtime_error("SIMT emulation: invalid block of " + std::to_string(threads) + " threads");
  if (grid.y > 65535 || grid.z > 65535 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    throw std::runtime_error("SIMT emulation: invalid grid");
  if (smem_bytes > kSharedMemoryLimit)
    throw std::runtime_error("SIMT emulation: " + std::to_string(smem_bytes) +
                             " bytes of dynamic shared memory exceed the 48 KiB default limit");
  std::tuple<std::decay_t<KernelArgs>...> packed(std::forward<Args>(args)...);
  struct Call {
    void (*kernel)(KernelArgs...);
    std::tuple<std::decay_t<KernelArgs>...>* args;
  } call{kernel, &packed};
  auto body = [](void* p) {
    auto* c = static_cast<Call*>(p);
    std::apply(c->kernel, *c->args);
  };
  Block runner(block, smem_bytes);
  const dim3 saved_grid = gridDim, saved_block = blockDim, saved_idx = blockIdx;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        runner.run(body, &call);
      }
  gridDim = saved_grid;
  blockDim = saved_block;
  blockIdx = saved_idx;
}

}  // namespace gsa::emu

// ---- the CUDA spellings the kernels use, at global scope like the CUDA builtins ----
using gsa::emu::blockDim;
using gsa::emu::blockIdx;
using gsa::emu::dim3;
using gsa::emu::gridDim;
using gsa::emu::threadIdx;
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }  // launch errors throw instead
constexpr int warpSize = gsa::emu::kWarpSize;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __syncthreads() ::gsa::emu::syncthreads(__LINE__)

inline void __syncwarp(unsigned mask = gsa::emu::kFullMask) {
  if (mask != gsa::emu::kFullMask) gsa::emu::block().fail("only full-warp __syncwarp is emulated");
  gsa::emu::block().syncwarp();
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
  (void)width;
  return gsa::emu::shuffle(mask, v, src_lane);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  (void)width;
  return gsa::emu::shuffle(mask, v, gsa::emu::block().lane() ^ lane_mask);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  (void)width;
  const int lane = gsa::emu::block().lane();
  const int src = lane + static_cast<int>(delta);
  T other = gsa::emu::shuffle(mask, v, src < warpSize ? src : lane);  // CUDA: out of range keeps v
  return other;
}
