// Fresh output buffers of the CPU backward kernels that write a full-size gradient once.
//
// A gradient the size of a 3-D batch (113 MB at the paper's size) comes from mmap, so two costs
// come with it that the kernel itself cannot avoid: the first write to every 4 KB page faults (the
// kernel zeroes it), and its pages start at the same offset as those of the input read beside it.
// empty_streaming_output takes both off: transparent huge pages where the system grants them on
// request (512 times fewer faults), and a start half a page away from x's.
#include <cstdint>
#include <memory>

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

// A fresh contiguous tensor like x whose data starts half a 4 KB page away from x's. Two large
// buffers from mmap share their offset in a page, and then every store to grad lands on the cache
// set (and, on AMD, the way-predictor tag) of the loads of x at the same index: the backward pass of
// the paper's 3-D batch ran at 133 ms against 17 ms with the offsets apart. The tensor owns its
// allocation from the CPU allocator (storage offset 0, as the op's fake kernel says).
at::Tensor empty_off_page_of(const at::Tensor& x) {
  constexpr uintptr_t kPage = 4096, kShift = kPage / 2;
  const size_t bytes = static_cast<size_t>(x.numel()) * x.element_size();
  auto block = std::make_shared<at::DataPtr>(c10::GetCPUAllocator()->allocate(bytes + kPage));
  const uintptr_t base = reinterpret_cast<uintptr_t>(block->get());
  const uintptr_t want = (reinterpret_cast<uintptr_t>(x.const_data_ptr()) + kShift) % kPage;
  const uintptr_t start = base + (want + kPage - base % kPage) % kPage;  // start % kPage == want
  return at::for_blob(reinterpret_cast<void*>(start), x.sizes())
      .deleter([block](void*) mutable { block.reset(); })
      .options(x.options())
      .make_tensor();
}

}  // namespace

at::Tensor empty_streaming_output(const at::Tensor& x) {
  at::Tensor out = empty_off_page_of(x);
  advise_huge_pages(out.data_ptr(), out.nbytes());
  return out;
}

}  // namespace invcoss
