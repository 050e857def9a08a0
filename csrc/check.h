// FASTPRUNE_CHECK(cond, printf-format, args...): TORCH_CHECK with a message formatted by
// snprintf into a stack buffer, then raised as a literal message.
//
// Why not TORCH_CHECK(cond, "text ", value, ...): that builds the message with c10::str, an
// std::ostringstream inlined into this library. On the first GPU machine (library built with
// /opt/gcc's g++), every such check crashed the process with SIGSEGV, while checks with a
// literal-only message raised. A literal message goes straight to c10's own torchCheckFail; so
// does this one, and nothing here touches iostreams (run 4 on that machine: all 29 bad-input
// tests raise). Shapes, devices and dtypes are written as c10 prints them ("[1, 768, 2048]",
// "cuda:0", "BFloat16"), so the messages did not change.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>

#define FASTPRUNE_CHECK(cond, ...)                                             \
  do {                                                                         \
    if (C10_UNLIKELY(!(cond))) {                                               \
      char fastprune_msg_[512];                                                \
      std::snprintf(fastprune_msg_, sizeof fastprune_msg_, __VA_ARGS__);       \
      TORCH_CHECK(false, static_cast<const char*>(fastprune_msg_));            \
    }                                                                          \
  } while (0)

namespace fastprune {

// "[d0, d1, ...]"; a shape too long for the buffer ends in "...]".
struct ShapeStr {
  char s[160];
  explicit ShapeStr(c10::IntArrayRef sizes) {
    size_t n = 0;
    s[n++] = '[';
    for (size_t i = 0; i < sizes.size(); ++i) {
      if (n + 32 >= sizeof s) {
        n += std::snprintf(s + n, sizeof s - n, "...");
        break;
      }
      n += std::snprintf(s + n, sizeof s - n, i ? ", %lld" : "%lld", static_cast<long long>(sizes[i]));
    }
    std::snprintf(s + n, sizeof s - n, "]");
  }
};

// "cpu", "cuda:0", "meta"; other device types by their number.
struct DeviceStr {
  char s[40];
  explicit DeviceStr(c10::Device d) {
    const char* type = d.is_cpu() ? "cpu" : d.is_cuda() ? "cuda" : d.is_meta() ? "meta" : nullptr;
    if (type == nullptr) {
      std::snprintf(s, sizeof s, "device type %d", static_cast<int>(d.type()));
    } else if (d.has_index()) {
      std::snprintf(s, sizeof s, "%s:%d", type, static_cast<int>(d.index()));
    } else {
      std::snprintf(s, sizeof s, "%s", type);
    }
  }
};

inline const char* dtype_str(c10::ScalarType t) { return c10::toString(t); }

}  // namespace fastprune
