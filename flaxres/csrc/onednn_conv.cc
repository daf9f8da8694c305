// oneDNN 3.x convolutions as XLA FFI handlers for the CPU (fp32, NHWC activations, HWIO weights).
//
// XLA:CPU's own convolutions reach about 40% of what oneDNN reaches on the same shapes
// (docs/onednn.md), so flaxres.cpu.onednn calls these three handlers through jax.ffi, wired into
// autodiff with jax.custom_vjp:
//
//   flaxres_onednn_conv_fwd          y[N,Ho,Wo,O]       = conv(x[N,H,W,C], w[KH,KW,C/G,O])
//   flaxres_onednn_conv_bwd_data     dx[N,H,W,C]        from dy[N,Ho,Wo,O], w[KH,KW,C/G,O]
//   flaxres_onednn_conv_bwd_weights  dw[KH,KW,C/G,O]    from x[N,H,W,C],   dy[N,Ho,Wo,O]
//   flaxres_onednn_conv_bn_fwd       y = [relu]((conv(x, w) - mean) * inv + bias [+ residual])
//        an eval-mode BatchNorm (mean, inv = scale / sqrt(var + eps), bias: [O] each) and the
//        ReLU / residual add after it as oneDNN post-ops, so that inference writes each
//        activation once; attributes relu and residual (0/1) besides those below, and a
//        one-element residual buffer where there is none.
//   flaxres_onednn_pack_weights      p[size]            = w[KH,KW,C/G,O] in the layout the
//        conv_bn_fwd primitive of the attributes (n, h, w, ho, wo besides those of conv_bn_fwd)
//        wants; flaxres_onednn_packed_weights_size (a C function) gives its length in floats.
//   flaxres_onednn_conv_bn_fwd_packed  conv_bn_fwd with p in place of w (attributes kh, kw, o
//        give w's shape): serving programs whose weights are constants reorder them once, at
//        trace time (flaxres.ops.CpuOps.pack_weights), instead of in every call.
//
// Attributes (int64): stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right (explicit,
// non-negative), groups (lax's feature_group_count: output channel o belongs to group
// o / (O/G), which is oneDNN's hwigo weight layout), threads (oneDNN's OpenMP threads for this
// call; 0 = OpenMP's default).
//
// Activations stay in XLA's NHWC buffers (no reorders); weights may be reordered to the blocked
// layout oneDNN prefers (small tensors). Primitives are created once per shape and thread count
// (oneDNN fixes the OpenMP team size when it creates a primitive) and cached behind a mutex;
// every execution has its own scratchpad (onednn_common.h).
#include <array>
#include <cstring>
#include <stdexcept>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "onednn_common.h"

namespace flaxres {
namespace {

using dims = dnnl::memory::dims;

enum Kind : int64_t {
  kForward = 0, kBackwardData = 1, kBackwardWeights = 2, kForwardBatchNorm = 3
};

// Post-ops of kForwardBatchNorm: bit 0 a ReLU, bit 1 a residual add.
constexpr int kRelu = 1, kResidual = 2;

// Everything that determines a primitive.
struct Geometry {
  int64_t n, h, w, c, o, ho, wo, kh, kw;
  int64_t stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups;
};

using Key = std::array<int64_t, 19>;

Key MakeKey(Kind kind, const Geometry& g, int post, int threads) {
  return {kind,        g.n,        g.h,        g.w,       g.c,          g.o,
          g.ho,        g.wo,       g.kh,       g.kw,      g.stride_h,   g.stride_w,
          g.pad_top,   g.pad_bottom, g.pad_left, g.pad_right, g.groups, post, threads};
}

// One convolution primitive with the descriptors of its three tensors and, where oneDNN wants the
// weights in another layout than XLA's HWIO buffer, the reorder to (inputs) or from (output) it.
struct Operand {
  int arg;
  dnnl::memory::desc user, internal;
  dnnl::primitive reorder;  // empty when user == internal
  dnnl::memory::desc reorder_scratch;
  bool needs_reorder() const { return user != internal; }
};

struct Entry {
  dnnl::primitive conv;
  dnnl::memory::desc scratch;
  Operand in0, in1, out;
  // kForwardBatchNorm: the per-channel and the residual operands of the post-ops, in order.
  std::vector<dnnl::memory::desc> post_args;
};

struct Descs {
  dnnl::memory::desc src, wei_any, wei_user, dst;
  dims strides, pad_l, pad_r;
};

Descs MakeDescs(const Geometry& g) {
  Descs d;
  d.src = dnnl::memory::desc({g.n, g.c, g.h, g.w}, f32, tag::nhwc);
  d.dst = dnnl::memory::desc({g.n, g.o, g.ho, g.wo}, f32, tag::nhwc);
  if (g.groups == 1) {
    dims wd{g.o, g.c, g.kh, g.kw};
    d.wei_user = dnnl::memory::desc(wd, f32, tag::hwio);
    d.wei_any = dnnl::memory::desc(wd, f32, tag::any);
  } else {
    dims wd{g.groups, g.o / g.groups, g.c / g.groups, g.kh, g.kw};
    d.wei_user = dnnl::memory::desc(wd, f32, tag::hwigo);
    d.wei_any = dnnl::memory::desc(wd, f32, tag::any);
  }
  d.strides = {g.stride_h, g.stride_w};
  d.pad_l = {g.pad_top, g.pad_left};
  d.pad_r = {g.pad_bottom, g.pad_right};
  return d;
}

Operand MakeOperand(int arg, const dnnl::memory::desc& user, const dnnl::memory::desc& internal,
                    bool is_output) {
  Operand op{arg, user, internal, {}, {}};
  if (op.needs_reorder()) {
    const auto& from = is_output ? internal : user;
    const auto& to = is_output ? user : internal;
    dnnl::reorder::primitive_desc pd(Engine(), from, Engine(), to, UserScratchpad());
    op.reorder = dnnl::reorder(pd);
    op.reorder_scratch = pd.scratchpad_desc();
  }
  return op;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(
    const Descs& d, const dnnl::primitive_attr& attr = UserScratchpad()) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, d.src,
      d.wei_any, d.dst, d.strides, d.pad_l, d.pad_r, attr);
}

// (y - mean) * inv + bias [+ residual] [relu] as post-ops, in the order eval-mode BatchNorm
// computes them; fills the descriptors of their operands.
dnnl::primitive_attr BatchNormPostOps(const Descs& d, int64_t channels, int post,
                                      std::vector<dnnl::memory::desc>& args) {
  dnnl::memory::desc channel({1, channels, 1, 1}, f32, tag::nhwc);
  dnnl::post_ops ops;
  for (auto alg : {dnnl::algorithm::binary_sub, dnnl::algorithm::binary_mul,
                   dnnl::algorithm::binary_add}) {
    ops.append_binary(alg, channel);
    args.push_back(channel);
  }
  if (post & kResidual) {
    ops.append_binary(dnnl::algorithm::binary_add, d.dst);
    args.push_back(d.dst);
  }
  if (post & kRelu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr attr = UserScratchpad();
  attr.set_post_ops(ops);
  return attr;
}

std::unique_ptr<Entry> Create(Kind kind, const Geometry& g, int post) {
  Descs d = MakeDescs(g);
  auto e = std::make_unique<Entry>();
  if (kind == kForward || kind == kForwardBatchNorm) {
    auto pd = kind == kForward ? ForwardDesc(d)
                               : ForwardDesc(d, BatchNormPostOps(d, g.o, post, e->post_args));
    e->conv = dnnl::convolution_forward(pd);
    e->scratch = pd.scratchpad_desc();
    e->in0 = MakeOperand(DNNL_ARG_SRC, d.src, pd.src_desc(), false);
    e->in1 = MakeOperand(DNNL_ARG_WEIGHTS, d.wei_user, pd.weights_desc(), false);
    e->out = MakeOperand(DNNL_ARG_DST, d.dst, pd.dst_desc(), true);
  } else if (kind == kBackwardData) {
    auto hint = ForwardDesc(d);
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, d.src, d.wei_any, d.dst, d.strides,
        d.pad_l, d.pad_r, hint, UserScratchpad());
    e->conv = dnnl::convolution_backward_data(pd);
    e->scratch = pd.scratchpad_desc();
    e->in0 = MakeOperand(DNNL_ARG_DIFF_DST, d.dst, pd.diff_dst_desc(), false);
    e->in1 = MakeOperand(DNNL_ARG_WEIGHTS, d.wei_user, pd.weights_desc(), false);
    e->out = MakeOperand(DNNL_ARG_DIFF_SRC, d.src, pd.diff_src_desc(), true);
  } else {
    auto hint = ForwardDesc(d);
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, d.src, d.wei_any, d.dst, d.strides,
        d.pad_l, d.pad_r, hint, UserScratchpad());
    e->conv = dnnl::convolution_backward_weights(pd);
    e->scratch = pd.scratchpad_desc();
    e->in0 = MakeOperand(DNNL_ARG_SRC, d.src, pd.src_desc(), false);
    e->in1 = MakeOperand(DNNL_ARG_DIFF_DST, d.dst, pd.diff_dst_desc(), false);
    e->out = MakeOperand(DNNL_ARG_DIFF_WEIGHTS, d.wei_user, pd.diff_weights_desc(), true);
  }
  return e;
}

const Entry& Cached(Kind kind, const Geometry& g, int post, int threads) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Entry>> cache;
  Key key = MakeKey(kind, g, post, threads);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, Create(kind, g, post)).first;
  return *it->second;
}

// Runs one convolution on XLA's buffers, with the post-ops' operands (e.post_args order);
// synchronous (oneDNN's OpenMP runtime returns when done).
// `in1_internal`: in1 is already in the primitive's layout (packed weights).
void Execute(const Entry& e, void* in0, void* in1, void* out,
             std::initializer_list<void*> post = {}, bool in1_internal = false) {
  // Separate buffers: the conv's scratchpad and each reordered operand are live at once.
  thread_local ThreadBuffer scratch_buf, in0_buf, in1_buf, out_buf, reorder_buf;
  dnnl::stream stream(Engine());
  auto internal = [&](const Operand& op, void* user_ptr, ThreadBuffer& buf) {
    dnnl::memory user(op.user, Engine(), user_ptr);
    if (!op.needs_reorder()) return std::make_pair(user, user);
    dnnl::memory inner(op.internal, Engine(), buf.Get(op.internal.get_size()));
    return std::make_pair(user, inner);
  };
  auto reorder = [&](const Operand& op, dnnl::memory& from, dnnl::memory& to) {
    dnnl::memory scratch(op.reorder_scratch, Engine(),
                         reorder_buf.Get(op.reorder_scratch.get_size()));
    op.reorder.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                {DNNL_ARG_SCRATCHPAD, scratch}});
  };
  auto [a_user, a] = internal(e.in0, in0, in0_buf);
  auto [b_user, b] = internal(e.in1, in1, in1_buf);
  if (in1_internal) b = dnnl::memory(e.in1.internal, Engine(), in1);
  auto [c_user, c] = internal(e.out, out, out_buf);
  if (e.in0.needs_reorder()) reorder(e.in0, a_user, a);
  if (e.in1.needs_reorder() && !in1_internal) reorder(e.in1, b_user, b);
  dnnl::memory scratch(e.scratch, Engine(), scratch_buf.Get(e.scratch.get_size()));
  std::unordered_map<int, dnnl::memory> args{
      {e.in0.arg, a}, {e.in1.arg, b}, {e.out.arg, c}, {DNNL_ARG_SCRATCHPAD, scratch}};
  int i = 0;
  for (void* ptr : post) {
    if (i == int(e.post_args.size())) break;  // a residual buffer the post-ops do not use
    args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(i) | DNNL_ARG_SRC_1,
                 dnnl::memory(e.post_args[i], Engine(), ptr));
    ++i;
  }
  e.conv.execute(stream, args);
  if (e.out.needs_reorder()) reorder(e.out, c, c_user);
  stream.wait();
}

using Buffer4 = ffi::Buffer<ffi::F32, 4>;
using Result4 = ffi::ResultBuffer<ffi::F32, 4>;

struct Attrs {
  int64_t stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups, threads;
};

// x: N,H,W,C   w: KH,KW,C/G,O   y: N,Ho,Wo,O
Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y, const Attrs& a) {
  return {x[0], x[1], x[2], x[3], w[3], y[1], y[2], w[0], w[1],
          a.stride_h, a.stride_w, a.pad_top, a.pad_bottom, a.pad_left, a.pad_right, a.groups};
}

// `packed_bytes` >= 0: in1 holds that many bytes of weights already in the primitive's layout.
ffi::Error Run(Kind kind, const Geometry& g, int64_t threads, void* in0, void* in1, void* out,
               int post = 0, std::initializer_list<void*> post_ptrs = {},
               int64_t packed_bytes = -1) {
  if (g.groups < 1 || g.c % g.groups != 0 || g.o % g.groups != 0) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "flaxres oneDNN conv: channels not divisible by groups");
  }
  return flaxres::Guarded("flaxres oneDNN conv", [&] {
    const Entry& e = Cached(kind, g, post, flaxres::UseThreads(threads));
    if (packed_bytes >= 0 && size_t(packed_bytes) != e.in1.internal.get_size()) {
      throw std::invalid_argument("packed weights of another convolution");
    }
    Execute(e, in0, in1, out, post_ptrs, packed_bytes >= 0);
  });
}

ffi::Error Forward(Buffer4 x, Buffer4 w, Result4 y, int64_t stride_h, int64_t stride_w,
                   int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                   int64_t groups, int64_t threads) {
  Attrs a{stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups, threads};
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), a);
  return Run(kForward, g, threads, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

int PostOps(int64_t relu, int64_t has_residual) {
  return (relu ? kRelu : 0) | (has_residual ? kResidual : 0);
}

using Buffer1 = ffi::Buffer<ffi::F32, 1>;
using AnyF32 = ffi::Buffer<ffi::F32>;

// The fused forward on HWIO (packed_bytes < 0) or packed weights.
ffi::Error RunBatchNorm(const Geometry& g, int64_t threads, Buffer4 x, void* w, Buffer1 mean,
                        Buffer1 inv, Buffer1 bias, AnyF32 residual, Result4 y, int64_t relu,
                        int64_t has_residual, int64_t packed_bytes = -1) {
  if (has_residual && residual.element_count() != y->element_count()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "flaxres oneDNN conv: the residual must have the output's shape");
  }
  return Run(kForwardBatchNorm, g, threads, x.untyped_data(), w, y->untyped_data(),
             PostOps(relu, has_residual),
             {mean.untyped_data(), inv.untyped_data(), bias.untyped_data(),
              residual.untyped_data()}, packed_bytes);
}

ffi::Error ForwardBatchNorm(Buffer4 x, Buffer4 w, Buffer1 mean, Buffer1 inv, Buffer1 bias,
                            AnyF32 residual, Result4 y, int64_t stride_h, int64_t stride_w,
                            int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                            int64_t pad_right, int64_t groups, int64_t threads, int64_t relu,
                            int64_t has_residual) {
  Attrs a{stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups, threads};
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), a);
  return RunBatchNorm(g, threads, x, w.untyped_data(), mean, inv, bias, residual, y, relu,
                      has_residual);
}

ffi::Error ForwardBatchNormPacked(Buffer4 x, AnyF32 packed, Buffer1 mean, Buffer1 inv,
                                  Buffer1 bias, AnyF32 residual, Result4 y, int64_t stride_h,
                                  int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                                  int64_t pad_left, int64_t pad_right, int64_t groups,
                                  int64_t threads, int64_t relu, int64_t has_residual,
                                  int64_t kh, int64_t kw, int64_t o) {
  Attrs a{stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups, threads};
  const int64_t w_dims[4] = {kh, kw, x.dimensions()[3] / (groups > 0 ? groups : 1), o};
  auto g = MakeGeometry(x.dimensions(), ffi::Span<const int64_t>(w_dims, 4), y->dimensions(), a);
  return RunBatchNorm(g, threads, x, packed.untyped_data(), mean, inv, bias, residual, y, relu,
                      has_residual, int64_t(packed.size_bytes()));
}

Geometry PackGeometry(ffi::Span<const int64_t> w, int64_t n, int64_t h, int64_t wd, int64_t ho,
                      int64_t wo, const Attrs& a) {
  return {n, h, wd, w[2] * a.groups, w[3], ho, wo, w[0], w[1],
          a.stride_h, a.stride_w, a.pad_top, a.pad_bottom, a.pad_left, a.pad_right, a.groups};
}

ffi::Error PackWeights(Buffer4 w, ffi::Result<AnyF32> packed, int64_t stride_h, int64_t stride_w,
                       int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                       int64_t groups, int64_t threads, int64_t relu, int64_t has_residual,
                       int64_t n, int64_t h, int64_t wd, int64_t ho, int64_t wo) {
  Attrs a{stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups, threads};
  auto g = PackGeometry(w.dimensions(), n, h, wd, ho, wo, a);
  return flaxres::Guarded("flaxres oneDNN weight packing", [&] {
    const Entry& e = Cached(kForwardBatchNorm, g, PostOps(relu, has_residual),
                            flaxres::UseThreads(threads));
    if (packed->size_bytes() != e.in1.internal.get_size()) {
      throw std::invalid_argument("packed weights buffer of the wrong size");
    }
    dnnl::memory from(e.in1.user, Engine(), w.untyped_data());
    dnnl::memory to(e.in1.internal, Engine(), packed->untyped_data());
    dnnl::stream stream(Engine());
    if (e.in1.needs_reorder()) {
      std::vector<char> scratch(e.in1.reorder_scratch.get_size() + 1);
      dnnl::memory pad(e.in1.reorder_scratch, Engine(), scratch.data());
      e.in1.reorder.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                     {DNNL_ARG_SCRATCHPAD, pad}});
    } else {
      std::memcpy(packed->untyped_data(), w.untyped_data(), packed->size_bytes());
    }
    stream.wait();
  });
}

ffi::Error BackwardData(Buffer4 dy, Buffer4 w, Result4 dx, int64_t stride_h, int64_t stride_w,
                        int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                        int64_t groups, int64_t threads) {
  Attrs a{stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups, threads};
  auto g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), a);
  return Run(kBackwardData, g, threads, dy.untyped_data(), w.untyped_data(),
             dx->untyped_data());
}

ffi::Error BackwardWeights(Buffer4 x, Buffer4 dy, Result4 dw, int64_t stride_h, int64_t stride_w,
                           int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                           int64_t pad_right, int64_t groups, int64_t threads) {
  Attrs a{stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups, threads};
  auto g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), a);
  return Run(kBackwardWeights, g, threads, x.untyped_data(), dy.untyped_data(),
             dw->untyped_data());
}

}  // namespace
}  // namespace flaxres

namespace ffi = xla::ffi;
using flaxres::AnyF32, flaxres::Buffer1, flaxres::Buffer4;

#define FLAXRES_CONV_ATTRS                                                          \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top")     \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right") \
      .Attr<int64_t>("groups").Attr<int64_t>("threads")

// Built with -fvisibility=hidden: only the handlers and the version query are exported.
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxres_onednn_conv_fwd, flaxres::Forward,
                              ffi::Ffi::Bind().Arg<Buffer4>().Arg<Buffer4>().Ret<Buffer4>()
                                  FLAXRES_CONV_ATTRS);
// x, the weights (HWIO, or packed), mean, inv, bias, residual -> y.
#define FLAXRES_CONV_BN_BINDING(WEIGHTS)                                                  \
  ffi::Ffi::Bind()                                                                        \
      .Arg<Buffer4>()                                                                     \
      .Arg<WEIGHTS>()                                                                     \
      .Arg<Buffer1>()                                                                     \
      .Arg<Buffer1>()                                                                     \
      .Arg<Buffer1>()                                                                     \
      .Arg<AnyF32>()                                                                      \
      .Ret<Buffer4>() FLAXRES_CONV_ATTRS.Attr<int64_t>("relu").Attr<int64_t>("residual")

XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxres_onednn_conv_bn_fwd, flaxres::ForwardBatchNorm,
                              FLAXRES_CONV_BN_BINDING(Buffer4));
XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxres_onednn_conv_bn_fwd_packed, flaxres::ForwardBatchNormPacked,
                              FLAXRES_CONV_BN_BINDING(AnyF32)
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("o"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxres_onednn_pack_weights, flaxres::PackWeights,
                              ffi::Ffi::Bind().Arg<Buffer4>().Ret<AnyF32>() FLAXRES_CONV_ATTRS
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("residual")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("h")
                                  .Attr<int64_t>("w")
                                  .Attr<int64_t>("ho")
                                  .Attr<int64_t>("wo"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxres_onednn_conv_bwd_data, flaxres::BackwardData,
                              ffi::Ffi::Bind().Arg<Buffer4>().Arg<Buffer4>().Ret<Buffer4>()
                                  FLAXRES_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(flaxres_onednn_conv_bwd_weights, flaxres::BackwardWeights,
                              ffi::Ffi::Bind().Arg<Buffer4>().Arg<Buffer4>().Ret<Buffer4>()
                                  FLAXRES_CONV_ATTRS);

// Length in floats of flaxres_onednn_pack_weights's output for these attributes; -1 when oneDNN
// has no such convolution.
extern "C" int64_t flaxres_onednn_packed_weights_size(
    int64_t n, int64_t h, int64_t w, int64_t c, int64_t o, int64_t ho, int64_t wo, int64_t kh,
    int64_t kw, int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
    int64_t pad_left, int64_t pad_right, int64_t groups, int64_t threads, int64_t relu,
    int64_t residual) {
  flaxres::Geometry g{n, h, w, c, o, ho, wo, kh, kw, stride_h, stride_w,
                      pad_top, pad_bottom, pad_left, pad_right, groups};
  try {
    const auto& e = flaxres::Cached(flaxres::kForwardBatchNorm, g,
                                    flaxres::PostOps(relu, residual),
                                    flaxres::UseThreads(threads));
    return int64_t(e.in1.internal.get_size() / sizeof(float));
  } catch (const std::exception&) {
    return -1;
  }
}

// "major.minor.patch" of the oneDNN the library runs with (for results files).
extern "C" const char* flaxres_onednn_version() {
  static const std::string v = [] {
    const dnnl_version_t* ver = dnnl_version();
    return std::to_string(ver->major) + "." + std::to_string(ver->minor) + "." +
           std::to_string(ver->patch);
  }();
  return v.c_str();
}
#pragma GCC visibility pop
