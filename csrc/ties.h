// SPEC's tie rule ("lowest j on an exact tie") for the CPU kernels.
//
// An exact tie is, in practice, a patch that is a copy of an earlier one: its score equals the
// earlier patch's in every row. The CPU kernels' matrix products (MKL's sgemm) round equal rows
// differently by their place in the product (the micro-kernel's tails), so the later copy
// outscored the earlier one by an ulp in about 1 of 30 random small shapes (a fuzz run of
// select and select_soft with a copied patch). The GPU kernels compute every element alike and
// keep the rule. So the CPU kernels leave later copies out of the argmax: a copy can then never
// win over its original, whatever the products round.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <utility>
#include <vector>

namespace fastprune {

// The columns of `cols` (increasing) that are not a bit-for-bit copy of an earlier column of
// `cols`, where column j is row j of `rows` ([N, D], contiguous, on the CPU). Rows are sorted by
// a hash of 16 elements spread over the row; only rows that share it are hashed whole, and only
// equal whole hashes are compared byte by byte. So a row without a copy costs 16 loads, not D.
inline std::vector<int64_t> without_later_copies(const at::Tensor& rows, const std::vector<int64_t>& cols) {
  const int64_t D = rows.size(1);
  const size_t es = rows.element_size(), row_bytes = static_cast<size_t>(D) * es;
  const auto* base = static_cast<const unsigned char*>(rows.data_ptr());
  auto row = [&](int64_t j) { return base + static_cast<size_t>(j) * row_bytes; };
  auto mix = [](uint64_t h, const unsigned char* p, size_t n) {  // FNV-1a
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
  };
  constexpr uint64_t kBasis = 0xcbf29ce484222325ull;
  const int64_t samples = std::min<int64_t>(D, 16);
  std::vector<std::pair<uint64_t, int64_t>> keyed(cols.size());
  for (size_t k = 0; k < cols.size(); ++k) {
    uint64_t h = kBasis;
    for (int64_t s = 0; s < samples; ++s) h = mix(h, row(cols[k]) + static_cast<size_t>(s * D / samples) * es, es);
    keyed[k] = {h, cols[k]};
  }
  std::sort(keyed.begin(), keyed.end());  // equal hashes together, each run in increasing j

  std::vector<int64_t> copies;
  std::vector<std::pair<uint64_t, int64_t>> kept;  // a run's originals: (whole hash, j)
  for (size_t lo = 0, hi; lo < keyed.size(); lo = hi) {
    for (hi = lo + 1; hi < keyed.size() && keyed[hi].first == keyed[lo].first; ++hi) {
    }
    if (hi - lo == 1) continue;
    kept.clear();
    for (size_t k = lo; k < hi; ++k) {
      const int64_t j = keyed[k].second;
      const uint64_t h = mix(kBasis, row(j), row_bytes);
      bool copy = false;
      for (const auto& [kh, kj] : kept) copy = copy || (kh == h && std::memcmp(row(kj), row(j), row_bytes) == 0);
      if (copy)
        copies.push_back(j);
      else
        kept.emplace_back(h, j);
    }
  }
  if (copies.empty()) return cols;
  std::sort(copies.begin(), copies.end());
  std::vector<int64_t> out;
  out.reserve(cols.size() - copies.size());
  std::set_difference(cols.begin(), cols.end(), copies.begin(), copies.end(), std::back_inserter(out));
  return out;
}

}  // namespace fastprune
