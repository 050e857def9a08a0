// The emulated kernels under ThreadSanitizer (tests/test_cuda_build.py builds this with
// tests/cpp/emu_prune.cpp and -fsanitize=thread; cuda_emu.h then makes every CUDA thread a TSan
// fiber ordered only by barriers and atomics). TSan reports a pair of conflicting accesses with
// no barrier between them even where the values happen to come out right, which the emulator's
// fixed warp order alone does not show.
//
//   emu_race planted 0|1      a toy kernel whose warps read each other's shared-memory stores
//                             without (0) or with (1) a barrier between: the detector's own check
//   emu_race OP DTYPE B N T D SMS CLUSTER VALID OFFSET KEEP MAX
//                             one op (0 select, 1 prune, 2 prune_padded; dtype 0 fp32, 1 fp16,
//                             2 bf16) on random inputs, run twice on one workspace (a graph
//                             replay); prompt tokens [OFFSET, OFFSET + VALID) valid, and sample
//                             0 without every third patch
#include "cuda_emu.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

extern "C" int fp_emu_run(int op, int dtype, int64_t B, int64_t N, int64_t T, int64_t D, const void* patches,
                          int64_t p_sb, int64_t p_sr, const void* task, int64_t t_sb, int64_t t_sr,
                          const bool* task_mask, const bool* patch_mask, int mask_voters, int64_t keep_tokens,
                          int64_t max_tokens, int num_sms, int* cluster, int64_t* idx_out, int64_t* counts_out,
                          void* pruned, bool* kept_mask, int64_t* kept_idx, int64_t k_capacity, int64_t* k_out,
                          uint64_t ws_word, int runs);

namespace {

int planted(bool barrier) {
  float out[64];
  emu::launch(
      [&] {
        __shared__ float tile[64];
        const unsigned t = threadIdx.x;
        tile[t] = static_cast<float>(t);
        if (barrier) __syncthreads();
        out[t] = tile[(t + 32) % 64];  // the other warp's store
      },
      dim3(1), dim3(64), 1, 0);
  std::printf("planted %s: out[0] = %g\n", barrier ? "with a barrier" : "without a barrier", out[0]);
  return 0;
}

// 16-bit encodings of a float (round to nearest even), as the inputs' dtypes store them.
uint16_t to_half(float x) {
  const _Float16 h = static_cast<_Float16>(x);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

int run_op(char** a) {
  const int op = std::atoi(a[0]), dtype = std::atoi(a[1]);
  const int64_t B = std::atoll(a[2]), N = std::atoll(a[3]), T = std::atoll(a[4]), D = std::atoll(a[5]);
  const int sms = std::atoi(a[6]);
  int cluster = std::atoi(a[7]);
  const int64_t valid = std::atoll(a[8]), offset = std::atoll(a[9]), keep = std::atoll(a[10]), cap = std::atoll(a[11]);
  const size_t es = dtype == 0 ? 4 : 2;
  std::mt19937 rng(static_cast<unsigned>(B * 131 + N * 31 + T * 7 + D));
  std::normal_distribution<float> normal;
  auto random_rows = [&](int64_t n) {
    std::vector<unsigned char> v(static_cast<size_t>(n) * es);
    for (int64_t i = 0; i < n; ++i) {
      const float x = normal(rng);
      if (dtype == 0) {
        std::memcpy(&v[i * 4], &x, 4);
      } else {
        const uint16_t u = dtype == 1 ? to_half(x) : to_bf16(x);
        std::memcpy(&v[i * 2], &u, 2);
      }
    }
    return v;
  };
  const std::vector<unsigned char> patches = random_rows(B * N * D), task = random_rows(B * T * D);
  std::unique_ptr<bool[]> task_mask(new bool[B * T]), patch_mask(new bool[B * N]);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) task_mask[b * T + t] = t >= offset && t < offset + valid;
    for (int64_t j = 0; j < N; ++j) patch_mask[b * N + j] = b != 0 || j % 3 != 0;
  }
  const int64_t cap_rows = N > cap ? N : cap;
  std::vector<int64_t> idx(B * N), counts(B), kept_idx(B * cap_rows);
  std::vector<unsigned char> pruned(static_cast<size_t>(B * cap_rows * D) * es);
  std::unique_ptr<bool[]> kept_mask(new bool[B * cap_rows]);
  int64_t K = 0;
  const int rc = fp_emu_run(op, dtype, B, N, T, D, patches.data(), N * D, D, task.data(), T * D, D, task_mask.get(),
                            patch_mask.get(), /*mask_voters=*/1, keep, cap, sms, &cluster, idx.data(), counts.data(),
                            pruned.data(), kept_mask.get(), kept_idx.data(), cap_rows, &K, ~0ull, /*runs=*/2);
  std::printf("rc=%d clustered=%d K=%lld\n", rc, cluster, static_cast<long long>(K));
  return rc >= 1 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "planted") return planted(std::atoi(argv[2]) != 0);
  if (argc == 13) return run_op(argv + 1);
  std::fprintf(stderr, "usage: emu_race planted 0|1 | emu_race OP DTYPE B N T D SMS CLUSTER VALID OFFSET KEEP MAX\n");
  return 2;
}
