// LibTorch user of the fastprune op library: linked as CMake's fastprune::fastprune
// (tests/cpp/CMakeLists.txt; the library's static initialisers register torch.ops.fastprune), it
// calls the three eval ops on CPU tensors through the dispatcher and checks the results: counts
// agree with kept_mask, kept indices increase and are valid patches, kept rows equal the input
// rows, padding is zero, a budget keeps exactly keep_tokens per sample, the static cap gives
// max_tokens rows, and select's row argmax is the one prune's selection votes with.
//
//   libtorch_prune     -> prints "OK ..." and exits 0
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

// The C++ signatures of the schemas in csrc/fastprune.cpp (Tensor? -> std::optional<at::Tensor>,
// SymInt? -> std::optional<int64_t>, SymInt -> int64_t, str -> c10::string_view). A keep_ratio
// is the caller's to turn into keep_tokens = max(1, ceil(keep_ratio * N)).
using PruneOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // pruned, kept_mask, kept_idx, counts
using SelectFn = at::Tensor(const at::Tensor& patches, const at::Tensor& task, const std::optional<at::Tensor>& task_mask,
                            const std::optional<at::Tensor>& patch_mask, bool mask_voters, c10::string_view backend);
using PruneFn = PruneOut(const at::Tensor& patches, const at::Tensor& task, const std::optional<at::Tensor>& task_mask,
                         const std::optional<at::Tensor>& patch_mask, std::optional<int64_t> keep_tokens,
                         bool mask_voters, c10::string_view backend);
using PrunePaddedFn = PruneOut(const at::Tensor& patches, const at::Tensor& task,
                               const std::optional<at::Tensor>& task_mask, const std::optional<at::Tensor>& patch_mask,
                               std::optional<int64_t> keep_tokens, int64_t max_tokens, bool mask_voters,
                               c10::string_view backend);

static int fail(const std::string& what) {
  std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  return 1;
}

// Checks one prune result; returns an empty string when it is consistent.
static std::string check(const PruneOut& out, const at::Tensor& patches, const at::Tensor& patch_mask,
                         std::optional<int64_t> keep_tokens) {
  const auto& [pruned, kept_mask, kept_idx, counts] = out;
  const int64_t B = patches.size(0), N = patches.size(1), D = patches.size(2), K = pruned.size(1);
  std::ostringstream err;
  if (pruned.sizes() != at::IntArrayRef({B, K, D}) || kept_mask.sizes() != at::IntArrayRef({B, K}) ||
      kept_idx.sizes() != at::IntArrayRef({B, K}) || counts.sizes() != at::IntArrayRef({B}))
    return "output shapes";
  if (kept_idx.scalar_type() != at::kLong || counts.scalar_type() != at::kLong ||
      kept_mask.scalar_type() != at::kBool)
    return "output dtypes";
  int64_t max_count = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = counts[b].item<int64_t>();
    max_count = std::max(max_count, c);
    if (kept_mask[b].sum().item<int64_t>() != c) err << "sample " << b << ": counts vs kept_mask; ";
    if (keep_tokens && c != std::min<int64_t>(*keep_tokens, patch_mask[b].sum().item<int64_t>()))
      err << "sample " << b << ": budget count " << c << "; ";
    int64_t prev = -1;
    for (int64_t r = 0; r < K; ++r) {
      const bool real = kept_mask[b][r].item<bool>();
      const int64_t j = kept_idx[b][r].item<int64_t>();
      if (real != (r < c)) err << "sample " << b << " row " << r << ": mask not a prefix; ";
      if (real) {
        if (j <= prev || j >= N) err << "sample " << b << " row " << r << ": index " << j << "; ";
        else if (!patch_mask[b][j].item<bool>()) err << "sample " << b << ": kept invalid patch " << j << "; ";
        else if (!at::equal(pruned[b][r], patches[b][j])) err << "sample " << b << " row " << r << ": row differs; ";
        prev = j;
      } else if (j != 0 || pruned[b][r].abs().sum().item<double>() != 0.0) {
        err << "sample " << b << " row " << r << ": padding not zero; ";
      }
    }
  }
  if (K != std::max<int64_t>(1, max_count)) err << "K = " << K << " but max count " << max_count << "; ";
  return err.str();
}

int main() {
  auto& dispatcher = c10::Dispatcher::singleton();
  auto select = dispatcher.findSchemaOrThrow("fastprune::select", "").typed<SelectFn>();
  auto prune = dispatcher.findSchemaOrThrow("fastprune::prune", "").typed<PruneFn>();
  auto prune_padded = dispatcher.findSchemaOrThrow("fastprune::prune_padded", "").typed<PrunePaddedFn>();

  at::manual_seed(0);
  const int64_t B = 3, N = 96, T = 12, D = 64;
  const auto patches = at::randn({B, N, D});
  const auto task = at::randn({B, T, D});
  auto task_mask = at::ones({B, T}, at::kBool);
  task_mask[0].narrow(0, 5, T - 5).fill_(false);  // sample 0: 5 valid prompt tokens
  auto patch_mask = at::ones({B, N}, at::kBool);
  patch_mask[1].narrow(0, 32, 32).fill_(false);   // sample 1 misses its middle camera

  const auto implicit = prune.call(patches, task, task_mask, patch_mask, std::nullopt, false, "cpu");
  std::string e = check(implicit, patches, patch_mask, std::nullopt);
  if (!e.empty()) return fail("implicit: " + e);
  const auto budget = prune.call(patches, task, task_mask, patch_mask, int64_t{10}, false, "auto");
  e = check(budget, patches, patch_mask, int64_t{10});
  if (!e.empty()) return fail("keep_tokens=10: " + e);

  // The static cap: exactly max_tokens rows; here no sample keeps more than the cap.
  const int64_t cap = std::get<0>(implicit).size(1) + 3;
  const auto padded = prune_padded.call(patches, task, task_mask, patch_mask, std::nullopt, cap, false, "cpu");
  if (std::get<0>(padded).size(1) != cap || !at::equal(std::get<3>(padded), std::get<3>(implicit)))
    return fail("prune_padded: rows or counts");
  // Implicit mode keeps the valid patches that some row's argmax chose.
  const auto idx = select.call(patches, task, task_mask, patch_mask, false, "cpu");
  for (int64_t b = 0; b < B; ++b) {
    const auto chosen = at::zeros({N}, at::kBool).index_fill_(0, idx[b], true) & patch_mask[b];
    if (chosen.sum().item<int64_t>() != std::get<3>(implicit)[b].item<int64_t>()) return fail("select vs prune counts");
  }

  bool rejected = false;  // bad input is refused before any kernel runs
  try {
    prune.call(patches, task, task_mask, patch_mask, int64_t{0}, false, "cpu");
  } catch (const c10::Error&) {
    rejected = true;
  }
  if (!rejected) return fail("keep_tokens=0 was accepted");

  const auto& counts = std::get<3>(implicit);
  std::printf("OK implicit counts=[%lld, %lld, %lld] K=%lld; keep_tokens=10 counts=[%lld, %lld, %lld]\n",
              (long long)counts[0].item<int64_t>(), (long long)counts[1].item<int64_t>(),
              (long long)counts[2].item<int64_t>(), (long long)std::get<0>(implicit).size(1),
              (long long)std::get<3>(budget)[0].item<int64_t>(), (long long)std::get<3>(budget)[1].item<int64_t>(),
              (long long)std::get<3>(budget)[2].item<int64_t>());
  return 0;
}
