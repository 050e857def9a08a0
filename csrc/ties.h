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

#include <cstdint>
#include <cstring>
#include <unordered_map>
#include <vector>

namespace fastprune {

// The columns of `cols` (increasing) that are not a bit-for-bit copy of an earlier column of
// `cols`, where column j is row j of `rows` ([N, D], contiguous, on the CPU). Rows are grouped
// by a hash of 16 elements spread over the row; only rows that share it are hashed whole, and
// only equal whole hashes are compared byte by byte. So rows without a copy cost 16 loads, not D.
inline std::vector<int64_t> without_later_copies(const at::Tensor& rows, const std::vector<int64_t>& cols) {
  const int64_t D = rows.size(1);
  const size_t es = rows.element_size(), row_bytes = static_cast<size_t>(D) * es;
  const auto* base = static_cast<const unsigned char*>(rows.data_ptr());
  auto row = [&](int64_t j) { return base + static_cast<size_t>(j) * row_bytes; };
  auto mix = [](uint64_t h, const unsigned char* p, size_t n) {  // FNV-1a
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
  };
  constexpr int64_t kSamples = 16;
  auto sampled_hash = [&](int64_t j) {
    uint64_t h = 0xcbf29ce484222325ull;
    const int64_t n = D < kSamples ? D : kSamples;
    for (int64_t k = 0; k < n; ++k) h = mix(h, row(j) + static_cast<size_t>(k * D / n) * es, es);
    return h;
  };
  auto whole_hash = [&](int64_t j) { return mix(0xcbf29ce484222325ull, row(j), row_bytes); };

  // Per sampled hash: the kept columns with it, and their whole hashes once there are two.
  struct Group {
    std::vector<int64_t> kept;
    std::vector<uint64_t> whole;
  };
  std::unordered_map<uint64_t, Group> groups;
  std::vector<int64_t> out;
  out.reserve(cols.size());
  for (int64_t j : cols) {
    Group& g = groups[sampled_hash(j)];
    bool copy = false;
    if (!g.kept.empty()) {
      if (g.whole.empty()) g.whole.push_back(whole_hash(g.kept[0]));
      const uint64_t h = whole_hash(j);
      for (size_t k = 0; k < g.kept.size() && !copy; ++k)
        copy = g.whole[k] == h && std::memcmp(row(g.kept[k]), row(j), row_bytes) == 0;
      if (!copy) g.whole.push_back(h);
    }
    if (!copy) {
      g.kept.push_back(j);
      out.push_back(j);
    }
  }
  return out;
}

}  // namespace fastprune
