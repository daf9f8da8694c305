// oneDNN's train-mode batch normalization as XLA FFI handlers for the CPU (fp32, NHWC), with the
// ReLU that follows it fused in where there is one.
//
// XLA:CPU computes a BatchNorm's statistics and output in four passes over the activation (the
// centred activation is written out once for the variance's reduction), and its backward in
// several more (docs/performance.md). oneDNN reads the activation three times and writes it once,
// and keeps the ReLU's mask for the backward pass in a workspace.
//
//   flaxres_onednn_bn_fwd  (x[N,H,W,C], scale[C], shift[C])
//                          -> y[N,H,W,C], mean[C], var[C] (biased), workspace[u8]
//        y = [relu]((x - mean) / sqrt(var + eps) * scale + shift)
//   flaxres_onednn_bn_bwd  (x, mean, var, dy, scale, workspace) -> dx, d_scale[C], d_shift[C]
//        the gradient of y, with mean and var as functions of x (their own cotangents are
//        added by flaxres.cpu.onednn where they are not zero)
//
// Attributes: epsilon (f32); relu (int64, 0 or 1); threads (oneDNN's OpenMP threads, 0 =
// OpenMP's default). The workspace must hold what the primitive keeps for the ReLU's backward
// (flaxres passes one byte per element, more than oneDNN needs). oneDNN 3.2 has no CPU
// implementation of the residual add + ReLU fusion (fuse_norm_add_relu), so a block's last
// BatchNorm runs here without activation and XLA adds the shortcut.
#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>

#include "onednn_common.h"

namespace flaxres {
namespace {

using flags = dnnl::normalization_flags;

using Key = std::array<int64_t, 8>;  // backward?, n, h, w, c, relu, epsilon's bits, threads

struct Entry {
  dnnl::primitive prim;
  dnnl::memory::desc data, channels, scratch, workspace;
};

flags Flags(bool relu) {
  flags f = flags::use_scale | flags::use_shift;
  return relu ? f | flags::fuse_norm_relu : f;
}

dnnl::memory::desc DataDesc(int64_t n, int64_t h, int64_t w, int64_t c) {
  return dnnl::memory::desc({n, c, h, w}, f32, tag::nhwc);
}

dnnl::batch_normalization_forward::primitive_desc ForwardDesc(const dnnl::memory::desc& data,
                                                              float epsilon, bool relu) {
  return dnnl::batch_normalization_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, data, data, epsilon, Flags(relu),
      UserScratchpad());
}

dnnl::batch_normalization_backward::primitive_desc BackwardDesc(
    const dnnl::memory::desc& data, float epsilon, bool relu,
    const dnnl::batch_normalization_forward::primitive_desc& hint) {
  return dnnl::batch_normalization_backward::primitive_desc(
      Engine(), dnnl::prop_kind::backward, data, data, data, epsilon, Flags(relu), hint,
      UserScratchpad());
}

std::unique_ptr<Entry> Create(bool backward, ffi::Span<const int64_t> x, bool relu,
                              float epsilon) {
  auto data = DataDesc(x[0], x[1], x[2], x[3]);
  auto fwd = ForwardDesc(data, epsilon, relu);
  auto e = std::make_unique<Entry>(
      Entry{{}, data, dnnl::memory::desc({x[3]}, f32, tag::a), {}, fwd.workspace_desc()});
  if (backward) {
    auto pd = BackwardDesc(data, epsilon, relu, fwd);
    e->prim = dnnl::batch_normalization_backward(pd);
    e->scratch = pd.scratchpad_desc();
  } else {
    e->prim = dnnl::batch_normalization_forward(fwd);
    e->scratch = fwd.scratchpad_desc();
  }
  return e;
}

const Entry& Cached(bool backward, ffi::Span<const int64_t> x, bool relu, float epsilon,
                    int threads, size_t workspace_bytes) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Entry>> cache;
  int32_t eps_bits;
  std::memcpy(&eps_bits, &epsilon, sizeof eps_bits);
  Key key{backward, x[0], x[1], x[2], x[3], relu, eps_bits, threads};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, Create(backward, x, relu, epsilon)).first;
  if (workspace_bytes < it->second->workspace.get_size()) {
    throw std::length_error("workspace smaller than the primitive needs");
  }
  return *it->second;
}

using Buffer4 = ffi::Buffer<ffi::F32, 4>;
using Buffer1 = ffi::Buffer<ffi::F32, 1>;
using Result4 = ffi::ResultBuffer<ffi::F32, 4>;
using Result1 = ffi::ResultBuffer<ffi::F32, 1>;
using Workspace = ffi::Buffer<ffi::U8, 1>;  // type aliases: no comma inside the macros below
using WorkspaceResult = ffi::ResultBuffer<ffi::U8, 1>;
using Args = std::initializer_list<std::pair<int, void*>>;

// Runs one primitive on XLA's buffers: activations, per-channel vectors, the workspace and a
// per-thread scratchpad.
void Execute(const Entry& e, Args data_args, Args channel_args, void* workspace) {
  thread_local ThreadBuffer scratch_buf;
  std::unordered_map<int, dnnl::memory> args;
  for (auto [arg, ptr] : data_args) args.emplace(arg, dnnl::memory(e.data, Engine(), ptr));
  for (auto [arg, ptr] : channel_args) args.emplace(arg, dnnl::memory(e.channels, Engine(), ptr));
  if (e.workspace.get_size() > 0) {
    args.emplace(DNNL_ARG_WORKSPACE, dnnl::memory(e.workspace, Engine(), workspace));
  }
  args.emplace(DNNL_ARG_SCRATCHPAD,
               dnnl::memory(e.scratch, Engine(), scratch_buf.Get(e.scratch.get_size())));
  dnnl::stream stream(Engine());
  e.prim.execute(stream, args);
  stream.wait();
}

ffi::Error Forward(Buffer4 x, Buffer1 scale, Buffer1 shift, Result4 y, Result1 mean,
                   Result1 var, WorkspaceResult workspace, float epsilon, int64_t relu,
                   int64_t threads) {
  return flaxres::Guarded("flaxres oneDNN batch norm", [&] {
    const Entry& e = Cached(false, x.dimensions(), relu != 0, epsilon,
                            flaxres::UseThreads(threads), workspace->element_count());
    Execute(e, {{DNNL_ARG_SRC, x.untyped_data()}, {DNNL_ARG_DST, y->untyped_data()}},
            {{DNNL_ARG_SCALE, scale.untyped_data()}, {DNNL_ARG_SHIFT, shift.untyped_data()},
             {DNNL_ARG_MEAN, mean->untyped_data()}, {DNNL_ARG_VARIANCE, var->untyped_data()}},
            workspace->untyped_data());
  });
}

ffi::Error Backward(Buffer4 x, Buffer1 mean, Buffer1 var, Buffer4 dy, Buffer1 scale,
                    Workspace workspace, Result4 dx, Result1 d_scale, Result1 d_shift,
                    float epsilon, int64_t relu, int64_t threads) {
  return flaxres::Guarded("flaxres oneDNN batch norm", [&] {
    const Entry& e = Cached(true, x.dimensions(), relu != 0, epsilon,
                            flaxres::UseThreads(threads), workspace.element_count());
    Execute(e,
            {{DNNL_ARG_SRC, x.untyped_data()}, {DNNL_ARG_DIFF_DST, dy.untyped_data()},
             {DNNL_ARG_DIFF_SRC, dx->untyped_data()}},
            {{DNNL_ARG_MEAN, mean.untyped_data()}, {DNNL_ARG_VARIANCE, var.untyped_data()},
             {DNNL_ARG_SCALE, scale.untyped_data()},
             {DNNL_ARG_DIFF_SCALE, d_scale->untyped_data()},
             {DNNL_ARG_DIFF_SHIFT, d_shift->untyped_data()}},
            workspace.untyped_data());
  });
}

}  // namespace
}  // namespace flaxres

namespace ffi = xla::ffi;
using flaxres::Buffer1, flaxres::Buffer4, flaxres::Workspace;

#define FLAXRES_BN_ATTRS \
  .Attr<float>("epsilon").Attr<int64_t>("relu").Attr<int64_t>("threads")

// Built with -fvisibility=hidden: only the handlers and the queries are exported.
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxres_onednn_bn_fwd, flaxres::Forward,
                              ffi::Ffi::Bind()
                                  .Arg<Buffer4>()
                                  .Arg<Buffer1>()
                                  .Arg<Buffer1>()
                                  .Ret<Buffer4>()
                                  .Ret<Buffer1>()
                                  .Ret<Buffer1>()
                                  .Ret<Workspace>() FLAXRES_BN_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxres_onednn_bn_bwd, flaxres::Backward,
                              ffi::Ffi::Bind()
                                  .Arg<Buffer4>()
                                  .Arg<Buffer1>()
                                  .Arg<Buffer1>()
                                  .Arg<Buffer4>()
                                  .Arg<Buffer1>()
                                  .Arg<Workspace>()
                                  .Ret<Buffer4>()
                                  .Ret<Buffer1>()
                                  .Ret<Buffer1>() FLAXRES_BN_ATTRS);

// The oneDNN implementation a batch norm of this shape runs ("bnorm_jit:avx512_core", or a slow
// reference one), for tests and docs; "unsupported: ..." where oneDNN has none.
extern "C" const char* flaxres_onednn_bn_impl(int64_t n, int64_t h, int64_t w, int64_t c,
                                              int relu, int backward) {
  static thread_local std::string info;
  try {
    auto data = flaxres::DataDesc(n, h, w, c);
    auto fwd = flaxres::ForwardDesc(data, 1e-5f, relu != 0);
    info = backward ? flaxres::BackwardDesc(data, 1e-5f, relu != 0, fwd).impl_info_str()
                    : fwd.impl_info_str();
  } catch (const dnnl::error& err) {
    info = std::string("unsupported: ") + err.what();
  }
  return info.c_str();
}
#pragma GCC visibility pop
