// What flaxres's oneDNN FFI handlers share: the engine, user-owned scratchpads, per-thread buffers,
// the OpenMP team size per call, and turning oneDNN's exceptions into FFI errors.
#ifndef FLAXRES_CSRC_ONEDNN_COMMON_H_
#define FLAXRES_CSRC_ONEDNN_COMMON_H_

#include <omp.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace flaxres {

namespace ffi = xla::ffi;
using tag = dnnl::memory::format_tag;
constexpr auto f32 = dnnl::memory::data_type::f32;

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// XLA may run two handlers at once on different threads, so every execution gets its own
// thread-local scratchpad (scratchpad_mode::user): the library-owned scratchpad is shared per
// primitive and gives wrong results under concurrent use.
inline dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A grown-on-demand, 64-byte aligned buffer per thread for scratchpads and reordered weights.
class ThreadBuffer {
 public:
  void* Get(size_t bytes) {
    if (bytes == 0) return nullptr;
    if (storage_.size() < bytes + 64) storage_.resize(bytes + 64);
    auto p = reinterpret_cast<uintptr_t>(storage_.data());
    return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
  }

 private:
  std::vector<char> storage_;
};

// oneDNN fixes the OpenMP team size when it creates a primitive, so the thread count is part of
// every cache key. It is per calling (XLA worker) thread and persists on it (XLA itself does not
// use OpenMP), so threads == 0 restores the process default explicitly. Returns the count in force.
inline int UseThreads(int64_t threads) {
  static const int default_threads = omp_get_max_threads();
  const int want = threads > 0 ? int(threads) : default_threads;
  if (omp_get_max_threads() != want) omp_set_num_threads(want);
  return want;
}

// Runs `body`, turning oneDNN's and the standard library's exceptions into an FFI error.
template <typename Body>
xla::ffi::Error Guarded(const char* what, Body body) {
  try {
    body();
  } catch (const dnnl::error& err) {
    return xla::ffi::Error(xla::ffi::ErrorCode::kInternal, std::string(what) + ": " + err.what());
  } catch (const std::exception& err) {
    return xla::ffi::Error(xla::ffi::ErrorCode::kInternal, std::string(what) + ": " + err.what());
  }
  return xla::ffi::Error::Success();
}

}  // namespace flaxres

#endif  // FLAXRES_CSRC_ONEDNN_COMMON_H_
