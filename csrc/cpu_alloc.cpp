// Fresh output buffers of the CPU backward kernels that write a full-size gradient once.
//
// A gradient the size of a 3-D batch (113 MB at the paper's size) comes from mmap, so two costs
// come with it that the kernel itself cannot avoid: the first write to every 4 KB page faults (the
// kernel zeroes it), and its pages start at the same offset as those of the input read beside it.
// empty_streaming_output takes both off: transparent huge pages where the system grants them on
// request (512 times fewer faults), and a start half a page away from x's.
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <ATen/ops/from_blob.h>
#include <c10/core/CPUAllocator.h>

#include "invcoss.h"

namespace invcoss {
namespace {

// Asking for transparent huge pages (where the system leaves them to madvise) cuts the first-touch
// faults 512-fold; below two huge pages the advice is not worth a system call.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#else
  (void)data;
  (void)bytes;
#endif
}

struct Block {
  at::DataPtr data;
  size_t bytes;
};

class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();  // never destroyed: tensors may outlive static destruction
    return *cache;
  }

  // A block of at least `bytes`: a cached one when one fits (at most twice the size), else a new one.
  std::shared_ptr<Block> acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if ((*it)->bytes >= bytes && (*it)->bytes <= 2 * bytes) {
          std::shared_ptr<Block> b = std::move(*it);
          free_.erase(it);
          cached_ -= b->bytes;
          return b;
        }
      }
    }
    auto b = std::make_shared<Block>(Block{c10::GetCPUAllocator()->allocate(bytes), bytes});
    advise_huge_pages(b->data.get(), bytes);
    return b;
  }

  void release(std::shared_ptr<Block> b) {
    if (b->bytes < kMinBytes || b->bytes > limit_) return;  // freed with the last reference
    std::lock_guard<std::mutex> lock(mu_);
    cached_ += b->bytes;
    free_.push_back(std::move(b));
    while (cached_ > limit_) {
      cached_ -= free_.front()->bytes;
      free_.pop_front();
    }
  }

 private:
  static constexpr size_t kMinBytes = size_t(4) << 20;

  BlockCache() {
    const char* env = std::getenv("INVCOSS_CPU_BUFFER_CACHE_MB");
    limit_ = (env != nullptr ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : size_t(1024)) << 20;
  }

  std::mutex mu_;
  std::deque<std::shared_ptr<Block>> free_;
  size_t cached_ = 0;
  size_t limit_ = 0;
};

// A fresh contiguous tensor like x whose data starts half a 4 KB page away from x's. Two large
// buffers from mmap share their offset in a page, and then every store to grad lands on the cache
// set (and, on AMD, the way-predictor tag) of the loads of x at the same index: the backward pass of
// the paper's 3-D batch ran at 133 ms against 17 ms with the offsets apart. The tensor owns its
// block (storage offset 0, as the op's fake kernel says) and hands it back to the cache when freed.
at::Tensor empty_off_page_of(const at::Tensor& x) {
  constexpr uintptr_t kPage = 4096, kShift = kPage / 2;
  const size_t bytes = static_cast<size_t>(x.numel()) * x.element_size();
  std::shared_ptr<Block> block = BlockCache::get().acquire(bytes + kPage);
  const uintptr_t base = reinterpret_cast<uintptr_t>(block->data.get());
  const uintptr_t want = (reinterpret_cast<uintptr_t>(x.const_data_ptr()) + kShift) % kPage;
  const uintptr_t start = base + (want + kPage - base % kPage) % kPage;  // start % kPage == want
  return at::for_blob(reinterpret_cast<void*>(start), x.sizes())
      .deleter([block](void*) mutable { BlockCache::get().release(std::move(block)); })
      .options(x.options())
      .make_tensor();
}

}  // namespace

at::Tensor empty_streaming_output(const at::Tensor& x) { return empty_off_page_of(x); }

}  // namespace invcoss
