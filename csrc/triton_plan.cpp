// The Triton backend's launch plans (triton_plan.h): the store, the call key, the parser, the
// buffers and parameter values of one replay, and the ops that fill and read the store:
//   _triton_plan_put       kernels/prune_triton.py stores the plan it recorded for a call's key;
//   _triton_plans_clear    drops every plan (bench/tune_triton.py's sweep changes what a key
//                          launches, see prune_triton.tuning);
//   _triton_plan_launches  what a replay of the call would launch, without launching it (tests).
// The replay itself (device guard, stream, memset, cuLaunchKernel) is in prune_cuda.cpp.
#include "triton_plan.h"

#include <torch/library.h>

#include <cstring>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <string>
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
  FASTPRUNE_CHECK(false, "fastprune: a Triton launch plan's op must be 'select' or 'prune_padded', got '%.*s'",
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
  p.fills.resize(r.count("fills", 64));
  p.launches.resize(r.count("launches", 16));
  p.outputs.resize(r.count("outputs", 64));
  std::vector<int64_t> buffer_bytes;
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
      FASTPRUNE_CHECK(s >= 0, "fastprune: Triton launch plan has a buffer size %lld", static_cast<long long>(s));
      numel *= s;
    }
    buffer_bytes.push_back(numel * static_cast<int64_t>(c10::elementSize(b.dtype)));
  }
  const auto n_buffers = static_cast<int64_t>(p.buffers.size());
  for (Fill& f : p.fills) {
    f.buffer = r.next("fill buffer");
    f.offset = r.next("fill offset");
    f.bytes = r.next("fill bytes");
    FASTPRUNE_CHECK(f.buffer >= 0 && f.buffer < n_buffers && f.offset >= 0 && f.bytes >= 0 &&
                        f.offset + f.bytes <= buffer_bytes[f.buffer],
                    "fastprune: Triton launch plan zeroes bytes [%lld, %lld) of buffer %lld, outside it",
                    static_cast<long long>(f.offset), static_cast<long long>(f.offset + f.bytes),
                    static_cast<long long>(f.buffer));
  }
  for (Launch& l : p.launches) {
    l.function = static_cast<uint64_t>(r.next("kernel"));
    for (uint32_t& g : l.grid) {
      const int64_t v = r.next("grid");
      FASTPRUNE_CHECK(v >= 1 && v <= INT32_MAX, "fastprune: Triton launch plan has a grid size %lld",
                      static_cast<long long>(v));
      g = static_cast<uint32_t>(v);
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
      FASTPRUNE_CHECK(kind >= 0 && kind <= static_cast<int64_t>(ParamKind::kNull),
                      "fastprune: Triton launch plan has a parameter of unknown kind %lld",
                      static_cast<long long>(kind));
      q.kind = static_cast<ParamKind>(kind);
      if (q.kind == ParamKind::kInput)
        FASTPRUNE_CHECK(q.a >= 0 && q.a < 4 && q.b >= 0,
                        "fastprune: Triton launch plan points at input %lld + %lld", static_cast<long long>(q.a),
                        static_cast<long long>(q.b));
      if (q.kind == ParamKind::kBuffer)
        FASTPRUNE_CHECK(q.a >= 0 && q.a < n_buffers && q.b >= 0 && q.b < buffer_bytes[q.a],
                        "fastprune: Triton launch plan points at buffer %lld + %lld, outside it",
                        static_cast<long long>(q.a), static_cast<long long>(q.b));
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
                  op == Op::kSelect ? "select" : "prune_padded", want, p.outputs.size());
  return p;
}

const at::Tensor* input(int64_t i, const at::Tensor& patches, const at::Tensor& task,
                        const std::optional<at::Tensor>& task_mask, const std::optional<at::Tensor>& patch_mask) {
  switch (i) {
    case 0:
      return &patches;
    case 1:
      return &task;
    case 2:
      return task_mask.has_value() ? &*task_mask : nullptr;
    default:
      return patch_mask.has_value() ? &*patch_mask : nullptr;
  }
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

// [function, grid x, y, z, block, shared, n_params, values...] per launch; a value is an
// address, an integer, or a float's bits, as the kernel receives it.
std::tuple<std::vector<at::Tensor>, std::vector<int64_t>> launches(
    c10::string_view op, const at::Tensor& patches, const at::Tensor& task,
    const std::optional<at::Tensor>& task_mask, const std::optional<at::Tensor>& patch_mask,
    std::optional<int64_t> keep_tokens, std::optional<int64_t> max_tokens, bool mask_voters) {
  const auto key = key_of(op_of(op), patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters);
  const auto plan = key ? find(*key) : nullptr;
  FASTPRUNE_CHECK(plan != nullptr, "fastprune: no Triton launch plan for this %.*s call",
                  static_cast<int>(op.size()), op.data());
  Prepared prep = prepare(*plan, patches, task, task_mask, patch_mask);
  std::vector<int64_t> out;
  for (size_t i = 0; i < plan->launches.size(); ++i) {
    const Launch& l = plan->launches[i];
    out.insert(out.end(), {static_cast<int64_t>(l.function), l.grid[0], l.grid[1], l.grid[2], l.block, l.shared,
                           static_cast<int64_t>(l.params.size())});
    for (size_t j = 0; j < l.params.size(); ++j) {
      const uint64_t slot = prep.values[i][j];
      if (l.params[j].kind == ParamKind::kInt32 || l.params[j].kind == ParamKind::kFloat32) {
        int32_t low;
        std::memcpy(&low, &slot, sizeof low);
        out.push_back(low);
      } else {
        out.push_back(static_cast<int64_t>(slot));
      }
    }
  }
  return {prep.buffers, out};
}

}  // namespace

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

Prepared prepare(const Plan& plan, const at::Tensor& patches, const at::Tensor& task,
                 const std::optional<at::Tensor>& task_mask, const std::optional<at::Tensor>& patch_mask) {
  Prepared r;
  r.buffers.reserve(plan.buffers.size());
  for (const Buffer& b : plan.buffers) r.buffers.push_back(at::empty(b.sizes, patches.options().dtype(b.dtype)));
  r.values.resize(plan.launches.size());
  r.args.resize(plan.launches.size());
  for (size_t i = 0; i < plan.launches.size(); ++i) {
    const auto& params = plan.launches[i].params;
    auto& values = r.values[i];
    values.assign(params.size(), 0);
    for (size_t j = 0; j < params.size(); ++j) {
      const Param& q = params[j];
      uint64_t& slot = values[j];
      switch (q.kind) {
        case ParamKind::kInput: {
          const at::Tensor* t = input(q.a, patches, task, task_mask, patch_mask);
          FASTPRUNE_CHECK(t != nullptr, "fastprune: Triton launch plan points at input %lld, which the call lacks",
                          static_cast<long long>(q.a));
          slot = reinterpret_cast<uintptr_t>(t->data_ptr()) + static_cast<uint64_t>(q.b);
          break;
        }
        case ParamKind::kBuffer:
          slot = reinterpret_cast<uintptr_t>(r.buffers[q.a].data_ptr()) + static_cast<uint64_t>(q.b);
          break;
        case ParamKind::kInt32:
        case ParamKind::kFloat32: {  // 4 bytes at the slot's start (little-endian hosts)
          const auto v = static_cast<int32_t>(q.a);
          std::memcpy(&slot, &v, sizeof v);
          break;
        }
        case ParamKind::kInt64:
          slot = static_cast<uint64_t>(q.a);
          break;
        case ParamKind::kNull:
          break;
      }
    }
    // The slots are final (the vector no longer grows): their addresses are the kernel's
    // parameter array.
    r.args[i].reserve(values.size());
    for (uint64_t& slot : values) r.args[i].push_back(&slot);
  }
  return r;
}

}  // namespace triton_plan

TORCH_LIBRARY_IMPL(fastprune, CompositeExplicitAutograd, m) {
  m.impl("_triton_plan_put", &triton_plan::put);
  m.impl("_triton_plan_launches", &triton_plan::launches);
}

TORCH_LIBRARY_IMPL(fastprune, CatchAll, m) { m.impl("_triton_plans_clear", &triton_plan::clear); }

}  // namespace fastprune
