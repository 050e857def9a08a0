// SPEC's tie rule ("lowest j on an exact tie") for the CPU kernels.
//
// An exact tie is, in practice, a patch that is a copy of an earlier one: its score equals the
// earlier patch's in every row. The CPU kernels' matrix products (MKL's sgemm) round equal rows
// differently by their place in the product (the micro-kernel's tails), so the later copy
// outscored the earlier one by an ulp in 11 (select) and 32 (select_soft) of 300 random small
// shapes with a copied patch (a fuzz run; the Triton kernels in the interpreter: 0 of 300). So
// the CPU kernels leave later copies out of the argmax: a copy can then never win over its
// original, whatever the products round.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastprune {

// Multilinear hash of a row's first `bytes` bytes as 32-bit words (a last partial word
// zero-filled): the sum of (w_k + a_k) * b_k mod 2^64, no chain from word to word.
inline uint64_t row_hash(const unsigned char* row, size_t bytes) {
  auto term = [](uint64_t w, uint64_t k) {
    return (w + 0x9e3779b97f4a7c15ull * (k + 1)) * (0xc2b2ae3d27d4eb4full * (k + 1) | 1);
  };
  uint64_t h = bytes;
  const size_t full = bytes / 4;
  for (size_t k = 0; k < full; ++k) {
    uint32_t w;
    std::memcpy(&w, row + 4 * k, 4);
    h += term(w, k);
  }
  if (4 * full < bytes) {
    uint32_t w = 0;
    std::memcpy(&w, row + 4 * full, bytes - 4 * full);
    h += term(w, full);
  }
  return h;
}

// The columns of `cols` (increasing) that are not a bit-for-bit copy of an earlier column of
// `cols`, where column j is row j of `rows` ([N, D], contiguous, on the CPU). Rows are first
// keyed by a hash of their first 64 bytes (one cache line); only rows whose key an earlier row
// has are hashed whole, and only equal whole hashes are compared byte by byte. Rows without a
// copy cost one cache line each (pi05, 768 x 2048 fp32: ~10 us a sample, against ~1.2 ms for the
// select op); the worst case, every row alike in its first 64 bytes, one read of every row
// (~1.4-1.9 ms there).
inline std::vector<int64_t> without_later_copies(const at::Tensor& rows, const std::vector<int64_t>& cols) {
  const size_t row_bytes = static_cast<size_t>(rows.size(1)) * rows.element_size();
  const size_t key_bytes = std::min<size_t>(row_bytes, 64);
  const auto* base = static_cast<const unsigned char*>(rows.data_ptr());
  auto row = [&](size_t k) { return base + static_cast<size_t>(cols[k]) * row_bytes; };
  const size_t n = cols.size();

  // Open addressing on the key: slot -> the first row with that key (an index into cols); the
  // later rows with that key that are no copy are chained behind it.
  size_t cap = 16;
  while (cap < 2 * n) cap *= 2;
  std::vector<uint64_t> slot_key(cap);
  std::vector<int64_t> slot_head(cap, -1), next(n, -1), last(n, -1);
  std::vector<uint64_t> whole(n);
  std::vector<char> have_whole(n, 0), copy(n, 0);
  auto whole_of = [&](size_t k) {
    if (!have_whole[k]) whole[k] = row_hash(row(k), row_bytes), have_whole[k] = 1;
    return whole[k];
  };
  bool any_copy = false;
  for (size_t k = 0; k < n; ++k) {
    const uint64_t key = row_hash(row(k), key_bytes);
    size_t s = (key ^ (key >> 29)) & (cap - 1);
    while (slot_head[s] >= 0 && slot_key[s] != key) s = (s + 1) & (cap - 1);
    if (slot_head[s] < 0) {
      slot_key[s] = key;
      slot_head[s] = last[k] = static_cast<int64_t>(k);
      continue;
    }
    const int64_t head = slot_head[s];
    for (int64_t o = head; o >= 0 && !copy[k]; o = next[o])
      copy[k] = whole_of(o) == whole_of(k) && std::memcmp(row(o), row(k), row_bytes) == 0;
    if (copy[k]) {
      any_copy = true;
    } else {
      next[last[head]] = static_cast<int64_t>(k);
      last[head] = static_cast<int64_t>(k);
    }
  }
  if (!any_copy) return cols;
  std::vector<int64_t> out;
  for (size_t k = 0; k < n; ++k)
    if (!copy[k]) out.push_back(cols[k]);
  return out;
}

}  // namespace fastprune
