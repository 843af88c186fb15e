// Memory for large outputs of the CPU kernels (empty_output in common.h).
//
// glibc serves allocations over 32 MiB with a fresh mmap each time, and the first write to every
// 4 KiB page then faults into the kernel, which zeroes it: for a 57 MB trajectory that is 14k
// faults and ~40 % of the op's time. Two remedies, both only for outputs >= 32 MiB:
//   - the memory is advised as transparent huge pages (2 MiB: 28 faults instead of 14k; where
//     the kernel grants no huge pages this is a plain mmap);
//   - a freed output buffer is kept (at most kKeep of them, kKeepBytes in all) and handed to the
//     next output of about its size, already faulted in, as a caching allocator would: a sampler
//     that calls the same op every step then never pays for page faults or zeroing. The cost is
//     that this memory is returned to the system only when the cache evicts it.
// Threads share the cache under its mutex. fork(): the forking thread holds the mutex across the
// fork (pthread_atfork), so the child never inherits it locked by a thread that does not exist
// there; the child keeps the kept buffers (its own copy-on-write copies).
// The storage stays resizable through the default CPU allocator.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <deque>
#include <mutex>

#include "common.h"

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace gsa::cpu {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMinBytes = size_t(32) << 20;  // below this glibc reuses freed heap memory
constexpr size_t kKeep = 2;
constexpr size_t kKeepBytes = size_t(512) << 20;

struct Mapping {
  void* base;
  size_t bytes;   // mapped
  char* start;    // 2 MiB aligned
  size_t usable;  // bytes from start
};

struct FreeBuffers {
  std::mutex mutex;
  std::deque<Mapping> kept;
  size_t kept_bytes = 0;
};

FreeBuffers& free_buffers() {
  static auto* buffers = new FreeBuffers();  // never destroyed: deleters may run at exit
  static const int at_fork = pthread_atfork([] { free_buffers().mutex.lock(); },
                                            [] { free_buffers().mutex.unlock(); },
                                            [] { free_buffers().mutex.unlock(); });
  (void)at_fork;
  return *buffers;
}

bool acquire(size_t nbytes, Mapping& out) {
  {
    FreeBuffers& fb = free_buffers();
    std::lock_guard<std::mutex> lock(fb.mutex);
    for (auto it = fb.kept.begin(); it != fb.kept.end(); ++it) {
      if (it->usable >= nbytes && it->usable - nbytes <= nbytes / 4) {  // about the right size
        out = *it;
        fb.kept_bytes -= it->bytes;
        fb.kept.erase(it);
        return true;
      }
    }
  }
  const size_t mapped = (nbytes + 2 * kHuge - 1) / kHuge * kHuge;  // room to align to 2 MiB
  void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return false;
  char* start = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + kHuge - 1) / kHuge * kHuge);
  const size_t usable = mapped - (start - static_cast<char*>(base));
  madvise(start, usable, MADV_HUGEPAGE);
  out = Mapping{base, mapped, start, usable};
  return true;
}

void release(void* ctx) {
  Mapping* m = static_cast<Mapping*>(ctx);
  Mapping evict[kKeep + 1];
  size_t n_evict = 0;
  {
    FreeBuffers& fb = free_buffers();
    std::lock_guard<std::mutex> lock(fb.mutex);
    fb.kept.push_back(*m);
    fb.kept_bytes += m->bytes;
    while (fb.kept.size() > kKeep || fb.kept_bytes > kKeepBytes) {
      evict[n_evict++] = fb.kept.front();
      fb.kept_bytes -= fb.kept.front().bytes;
      fb.kept.pop_front();
    }
  }
  for (size_t i = 0; i < n_evict; ++i) munmap(evict[i].base, evict[i].bytes);
  delete m;
}

}  // namespace
#endif

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t nbytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  Mapping m;
  if (nbytes >= kMinBytes && acquire(nbytes, m)) {
    c10::DataPtr ptr(m.start, new Mapping(m), &release, at::Device(at::kCPU));
    c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, std::move(ptr),
                         c10::GetCPUAllocator(), /*resizable=*/true);
    return at::empty({0}, options).set_(storage, 0, sizes);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace gsa::cpu
