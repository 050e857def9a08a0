// The Triton backend's launch plans (triton_plan.h): the store, the call key, the parser, the
// buffers and parameter values of one replay, and the ops that fill and read the store:
//   _triton_plan_put       kernels/prune_triton.py stores the plan it recorded for a call's key;
//   _triton_plans_clear    drops every plan (bench/tune_triton.py's sweep changes what a key
//                          launches, see prune_triton.tuning);
//   _triton_plan_launches  what a replay of the call would launch, without launching it (tests).
// The replay itself (device guard, stream, cuLaunchKernel) is in prune_cuda.cpp.
#include "triton_plan.h"

#include <torch/library.h>

#include <cstring>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <tuple>

#include "check.h"

namespace fastprune {
namespace triton_plan {
namespace {

std::shared_mutex store_mu;
std::map<Key, std::shared_ptr<const Plan>>& store() {
  static std::map<Key, std::shared_ptr<const Plan>> plans;
  return plans;
}

Op op_of(c10::string_view name) {
  if (name == "select") return Op::kSelect;
  if (name == "prune_padded") return Op::kPrunePadded;
  if (name == "prune") return Op::kPrune;
  FASTPRUNE_CHECK(false,
                  "fastprune: a Triton launch plan's op must be 'select', 'prune' or 'prune_padded', got '%.*s'",
                  static_cast<int>(name.size()), name.data());
}

// Reads the encoded plan (triton_plan.h) front to back, checking every count and index.
class Reader {
 public:
  explicit Reader(c10::IntArrayRef v) : v_(v) {}
  int64_t next(const char* what) {
    FASTPRUNE_CHECK(pos_ < v_.size(), "fastprune: Triton launch plan ends early, at its %s (%zu values)", what,
                    v_.size());
    return v_[pos_++];
  }
  int64_t count(const char* what, int64_t most) {
    const int64_t n = next(what);
    FASTPRUNE_CHECK(n >= 0 && n <= most, "fastprune: Triton launch plan has %lld %s (0 to %lld allowed)",
                    static_cast<long long>(n), what, static_cast<long long>(most));
    return n;
  }
  bool done() const { return pos_ == v_.size(); }

 private:
  c10::IntArrayRef v_;
  size_t pos_ = 0;
};

Plan parse(Op op, c10::IntArrayRef encoded) {
  Reader r(encoded);
  const int64_t version = r.next("version");
  FASTPRUNE_CHECK(version == kPlanVersion, "fastprune: Triton launch plan version %lld, this library reads %lld",
                  static_cast<long long>(version), static_cast<long long>(kPlanVersion));
  Plan p;
  p.buffers.resize(r.count("buffers", 64));
  p.launches.resize(r.count("launches", 16));
  p.outputs.resize(r.count("outputs", 64));
  p.k_launch = r.next("K launch");
  p.k_buffer = r.next("K buffer");
  p.k_offset = r.next("K offset");
  const bool reads_k = p.k_launch >= 0;
  FASTPRUNE_CHECK(reads_k == (op == Op::kPrune), "fastprune: a Triton launch plan of %s %s K on the host",
                  op_name(op), reads_k ? "cannot read" : "must read");
  std::vector<int64_t> buffer_bytes;  // -1: has a K dimension
  for (Buffer& b : p.buffers) {
    const int64_t st = r.next("buffer dtype");
    FASTPRUNE_CHECK(st >= 0 && st < static_cast<int64_t>(c10::ScalarType::NumOptions),
                    "fastprune: Triton launch plan has a buffer of unknown scalar type %lld",
                    static_cast<long long>(st));
    b.dtype = static_cast<c10::ScalarType>(st);
    b.sizes.resize(r.count("buffer dimensions", 8));
    int64_t numel = 1;
    for (int64_t& s : b.sizes) {
      s = r.next("buffer size");
      FASTPRUNE_CHECK(s >= 0 || (s == -1 && reads_k), "fastprune: Triton launch plan has a buffer size %lld",
                      static_cast<long long>(s));
      b.has_k = b.has_k || s == -1;
      numel *= s;
    }
    buffer_bytes.push_back(b.has_k ? -1 : numel * static_cast<int64_t>(c10::elementSize(b.dtype)));
  }
  const auto n_buffers = static_cast<int64_t>(p.buffers.size());
  const auto in_buffer = [&](int64_t buffer, int64_t offset, int64_t bytes) {
    return buffer >= 0 && buffer < n_buffers && offset >= 0 && bytes >= 0 &&
           (buffer_bytes[buffer] < 0 ? offset == 0 && bytes == 0 : offset + bytes <= buffer_bytes[buffer]);
  };
  if (reads_k)
    FASTPRUNE_CHECK(p.k_launch < static_cast<int64_t>(p.launches.size()) && in_buffer(p.k_buffer, p.k_offset, 4) &&
                        p.k_offset % 4 == 0 && !p.buffers[p.k_buffer].has_k,
                    "fastprune: Triton launch plan reads K at launch %lld from bytes %lld of buffer %lld, outside it",
                    static_cast<long long>(p.k_launch), static_cast<long long>(p.k_offset),
                    static_cast<long long>(p.k_buffer));
  for (size_t i = 0; i < p.launches.size(); ++i) {
    Launch& l = p.launches[i];
    const bool after_k = reads_k && static_cast<int64_t>(i) >= p.k_launch;
    l.function = static_cast<uint64_t>(r.next("kernel"));
    for (int64_t& g : l.grid) {
      g = r.next("grid");
      FASTPRUNE_CHECK((g >= 1 || (g < 0 && after_k)) && g <= INT32_MAX && g >= -INT32_MAX,
                      "fastprune: Triton launch plan has a grid size %lld", static_cast<long long>(g));
    }
    const int64_t block = r.next("block"), shared = r.next("shared memory");
    FASTPRUNE_CHECK(block >= 32 && block <= 1024 && shared >= 0 && shared <= INT32_MAX,
                    "fastprune: Triton launch plan has %lld threads per block and %lld shared bytes",
                    static_cast<long long>(block), static_cast<long long>(shared));
    l.block = static_cast<uint32_t>(block);
    l.shared = static_cast<uint32_t>(shared);
    l.params.resize(r.count("kernel parameters", 64));
    for (Param& q : l.params) {
      const int64_t kind = r.next("parameter kind");
      q.a = r.next("parameter");
      q.b = r.next("parameter");
      FASTPRUNE_CHECK(kind >= 0 && kind <= static_cast<int64_t>(ParamKind::kK),
                      "fastprune: Triton launch plan has a parameter of unknown kind %lld",
                      static_cast<long long>(kind));
      q.kind = static_cast<ParamKind>(kind);
      if (q.kind == ParamKind::kInput)
        FASTPRUNE_CHECK(q.a >= 0 && q.a < 4 && q.b >= 0,
                        "fastprune: Triton launch plan points at input %lld + %lld", static_cast<long long>(q.a),
                        static_cast<long long>(q.b));
      if (q.kind == ParamKind::kBuffer)
        FASTPRUNE_CHECK(in_buffer(q.a, q.b, 1) || (q.a >= 0 && q.a < n_buffers && buffer_bytes[q.a] < 0 && q.b == 0),
                        "fastprune: Triton launch plan points at buffer %lld + %lld, outside it",
                        static_cast<long long>(q.a), static_cast<long long>(q.b));
      if (q.kind == ParamKind::kBuffer || q.kind == ParamKind::kK)
        FASTPRUNE_CHECK(after_k || (q.kind == ParamKind::kBuffer && !p.buffers[q.a].has_k),
                        "fastprune: Triton launch plan uses K in launch %zu, before K is read", i);
    }
  }
  for (int64_t& o : p.outputs) {
    o = r.next("output");
    FASTPRUNE_CHECK(o >= 0 && o < n_buffers, "fastprune: Triton launch plan returns buffer %lld of %lld",
                    static_cast<long long>(o), static_cast<long long>(n_buffers));
  }
  FASTPRUNE_CHECK(r.done(), "fastprune: Triton launch plan has %zu values past its end", encoded.size());
  const size_t want = op == Op::kSelect ? 1 : 4;
  FASTPRUNE_CHECK(p.outputs.size() == want, "fastprune: a Triton launch plan of %s returns %zu tensors, got %zu",
                  op_name(op), want, p.outputs.size());
  return p;
}

bool put(c10::string_view op, const at::Tensor& patches, const at::Tensor& task,
         const std::optional<at::Tensor>& task_mask, const std::optional<at::Tensor>& patch_mask,
         std::optional<int64_t> keep_tokens, std::optional<int64_t> max_tokens, bool mask_voters,
         c10::IntArrayRef encoded) {
  const Op o = op_of(op);
  auto key = key_of(o, patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters);
  auto plan = std::make_shared<const Plan>(parse(o, encoded));
  if (!key) return false;
  std::unique_lock<std::shared_mutex> lock(store_mu);
  store()[*key] = std::move(plan);
  return true;
}

void clear() {
  std::unique_lock<std::shared_mutex> lock(store_mu);
  store().clear();
}

// [function, grid x, y, z, block, shared, n_params, values...] per launch (values as
// Replay::value), with K = `k` for prune's launches after its host read.
std::tuple<std::vector<at::Tensor>, std::vector<int64_t>> launches(
    c10::string_view op, const at::Tensor& patches, const at::Tensor& task,
    const std::optional<at::Tensor>& task_mask, const std::optional<at::Tensor>& patch_mask,
    std::optional<int64_t> keep_tokens, std::optional<int64_t> max_tokens, bool mask_voters,
    std::optional<int64_t> k) {
  const auto key = key_of(op_of(op), patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters);
  const auto plan = key ? find(*key) : nullptr;
  FASTPRUNE_CHECK(plan != nullptr, "fastprune: no Triton launch plan for this %.*s call",
                  static_cast<int>(op.size()), op.data());
  FASTPRUNE_CHECK(k.has_value() == (plan->k_launch >= 0) && k.value_or(1) >= 1,
                  "fastprune: a %.*s plan's launches need k >= 1 exactly when the op reads K on the host",
                  static_cast<int>(op.size()), op.data());
  Replay replay(*plan, patches, task, task_mask, patch_mask);
  if (k) replay.allocate_k(*k);
  std::vector<int64_t> out;
  for (size_t i = 0; i < plan->launches.size(); ++i) {
    const Launch& l = plan->launches[i];
    uint32_t grid[3];
    replay.grid(i, grid);
    replay.args(i);
    out.insert(out.end(), {static_cast<int64_t>(l.function), grid[0], grid[1], grid[2], l.block, l.shared,
                           static_cast<int64_t>(l.params.size())});
    for (size_t j = 0; j < l.params.size(); ++j) out.push_back(replay.value(i, j));
  }
  return {replay.buffers(), out};
}

}  // namespace

const char* op_name(Op op) { return op == Op::kSelect ? "select" : op == Op::kPrune ? "prune" : "prune_padded"; }

std::optional<Key> key_of(Op op, const at::Tensor& patches, const at::Tensor& task,
                          const std::optional<at::Tensor>& task_mask, const std::optional<at::Tensor>& patch_mask,
                          std::optional<int64_t> keep_tokens, std::optional<int64_t> max_tokens, bool mask_voters) {
  Key k;
  k.reserve(24);
  const auto dev = patches.device();
  k.insert(k.end(), {static_cast<int64_t>(op), static_cast<int64_t>(dev.type()), dev.index(),
                     keep_tokens.value_or(-1), max_tokens.value_or(-1), mask_voters});
  for (const at::Tensor* t : {&patches, &task, task_mask ? &*task_mask : nullptr, patch_mask ? &*patch_mask : nullptr}) {
    if (t == nullptr) {
      k.push_back(-1);
      continue;
    }
    if (!t->is_contiguous()) return std::nullopt;
    k.push_back(static_cast<int64_t>(t->scalar_type()));
    k.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(t->data_ptr()) & 15));
    k.insert(k.end(), t->sizes().begin(), t->sizes().end());
  }
  return k;
}

std::shared_ptr<const Plan> find(const Key& key) {
  std::shared_lock<std::shared_mutex> lock(store_mu);
  const auto& plans = store();
  const auto it = plans.find(key);
  return it == plans.end() ? nullptr : it->second;
}

Replay::Replay(const Plan& plan, const at::Tensor& patches, const at::Tensor& task,
               const std::optional<at::Tensor>& task_mask, const std::optional<at::Tensor>& patch_mask)
    : plan_(plan),
      inputs_{&patches, &task, task_mask ? &*task_mask : nullptr, patch_mask ? &*patch_mask : nullptr},
      buffers_(plan.buffers.size()),
      values_(plan.launches.size()),
      args_(plan.launches.size()) {
  for (size_t i = 0; i < plan.buffers.size(); ++i)
    if (!plan.buffers[i].has_k)
      buffers_[i] = at::empty(plan.buffers[i].sizes, patches.options().dtype(plan.buffers[i].dtype));
}

void Replay::allocate_k(int64_t k) {
  k_ = k;
  for (size_t i = 0; i < plan_.buffers.size(); ++i) {
    const Buffer& b = plan_.buffers[i];
    if (!b.has_k) continue;
    std::vector<int64_t> sizes = b.sizes;
    for (int64_t& s : sizes) s = s == -1 ? k : s;
    buffers_[i] = at::empty(sizes, inputs_[0]->options().dtype(b.dtype));
  }
}

void Replay::grid(size_t i, uint32_t out[3]) const {
  for (int d = 0; d < 3; ++d) {
    const int64_t g = plan_.launches[i].grid[d];
    out[d] = static_cast<uint32_t>(g > 0 ? g : (k_ + (-g) - 1) / (-g));
  }
}

void** Replay::args(size_t i) {
  const auto& params = plan_.launches[i].params;
  auto& values = values_[i];
  values.assign(params.size(), 0);
  for (size_t j = 0; j < params.size(); ++j) {
    const Param& q = params[j];
    uint64_t& slot = values[j];
    int32_t v32 = 0;
    switch (q.kind) {
      case ParamKind::kInput: {
        const at::Tensor* t = inputs_[q.a];
        FASTPRUNE_CHECK(t != nullptr, "fastprune: Triton launch plan points at input %lld, which the call lacks",
                        static_cast<long long>(q.a));
        slot = reinterpret_cast<uintptr_t>(t->data_ptr()) + static_cast<uint64_t>(q.b);
        break;
      }
      case ParamKind::kBuffer:
        slot = reinterpret_cast<uintptr_t>(buffers_[q.a].data_ptr()) + static_cast<uint64_t>(q.b);
        break;
      case ParamKind::kInt32:
      case ParamKind::kFloat32:
        v32 = static_cast<int32_t>(q.a);
        break;
      case ParamKind::kK:
        v32 = static_cast<int32_t>(k_);
        break;
      case ParamKind::kInt64:
        slot = static_cast<uint64_t>(q.a);
        break;
      case ParamKind::kNull:
        break;
    }
    if (q.kind == ParamKind::kInt32 || q.kind == ParamKind::kFloat32 || q.kind == ParamKind::kK)
      std::memcpy(&slot, &v32, sizeof v32);  // 4 bytes at the slot's start (little-endian hosts)
  }
  auto& args = args_[i];
  args.clear();
  for (uint64_t& slot : values) args.push_back(&slot);
  return args.data();
}

int64_t Replay::value(size_t i, size_t j) const {
  const uint64_t slot = values_[i][j];
  const ParamKind kind = plan_.launches[i].params[j].kind;
  if (kind == ParamKind::kInt32 || kind == ParamKind::kFloat32 || kind == ParamKind::kK) {
    int32_t low;
    std::memcpy(&low, &slot, sizeof low);
    return low;
  }
  return static_cast<int64_t>(slot);
}

}  // namespace triton_plan

TORCH_LIBRARY_IMPL(fastprune, CompositeExplicitAutograd, m) {
  m.impl("_triton_plan_put", &triton_plan::put);
  m.impl("_triton_plan_launches", &triton_plan::launches);
}

TORCH_LIBRARY_IMPL(fastprune, CatchAll, m) { m.impl("_triton_plans_clear", &triton_plan::clear); }

}  // namespace fastprune
