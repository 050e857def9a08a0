// at::parallel_for for bodies that call ATen ops (the CPU kernels' row tiles and samples).
//
// The dispatcher's state is thread-local. A kernel's own ATen ops belong below Autograd (they
// are the op's implementation, not part of the caller's graph), and an OpenMP worker thread
// starts without that: its ops recorded autograd history on inputs that require grad, and
// outputs written from it then required grad (opcheck's fake-tensor check of select_soft failed).
// Each chunk runs below Autograd here. Copying the caller's whole thread-local state into the
// workers instead (at::ThreadLocalStateGuard) was measured slower: the select op at pi05 took
// 1.8 ms against 1.2 ms. Nested ATen ops run single-threaded inside (at::parallel_for's guard).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cstdint>

namespace fastprune {

template <typename F>
void parallel_ops(int64_t begin, int64_t end, const F& body) {
  at::parallel_for(begin, end, 1, [&](int64_t b, int64_t e) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    body(b, e);
  });
}

}  // namespace fastprune
