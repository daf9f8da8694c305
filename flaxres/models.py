"""The ResNet family in Flax NNX, laid out like torchvision's ``models/resnet.py``.

Attribute names follow the PyTorch modules one to one (``conv1``, ``bn1``, ``layer1[0].conv2``,
``downsample[0]``, ``fc``) so that :mod:`flaxres.convert` can derive the weight mapping from the
module tree alone. Everything is NHWC; kernels are HWIO.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from flaxres import ops

Shortcut = Literal["A", "B", "C"] | None
Stem = Literal["cifar", "imagenet"]

# PyTorch's init: Kaiming-normal (fan_out, ReLU gain) for convs as torchvision does; nn.Linear's
# default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the classifier weight and bias.
conv_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _uniform_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class FeatureInfo(NamedTuple):
    """One entry of :attr:`ResNet.feature_info` (timm's names): where a feature map comes from,
    its channels and its stride relative to the input."""

    module: str  # "stem", "layer1", ...
    num_chs: int
    reduction: int


class BatchNorm(nnx.Module):
    """BatchNorm with PyTorch's semantics, so that train-mode runs match ``nn.BatchNorm2d``.

    Differs from ``nnx.BatchNorm`` in two ways that matter for parity: ``momentum`` is PyTorch's
    (weight of the *new* batch statistic, default 0.1), and the running variance is updated with
    the unbiased batch variance (n / (n-1)) while normalisation uses the biased one. Statistics are
    computed in at least fp32 whatever the compute dtype. Under ``jax.jit`` with a batch-sharded input the
    means are over the global batch, as in a single-device PyTorch run.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
                 dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
                 use_running_average: bool = False, cpu_ops: ops.CpuOps = ops.CpuOps()):
        self.num_features = num_features
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.use_running_average = use_running_average
        self.cpu_ops = cpu_ops
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))

    def __call__(self, x: jax.Array, *, relu: bool = False) -> jax.Array:
        """Normalised ``x``; ``relu=True`` applies the ReLU that follows in the net, which the CPU
        backend fuses into the normalisation (same function)."""
        out_dtype = self.dtype or x.dtype
        x32 = x.astype(ops.accumulation_dtype(x.dtype))
        fuse = relu and x32.dtype == out_dtype  # bf16 models apply the ReLU after rounding
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            # Same formula as below, with a closed-form backward pass on the CPU (flaxres.ops).
            y, mean, var = ops.batch_norm_train(x32, self.scale[...], self.bias[...],
                                                self.epsilon, relu=fuse, cpu=self.cpu_ops)
            n = math.prod(x.shape[:-1])
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * mean
            self.var[...] = (1 - m) * self.var[...] + m * var * (n / max(n - 1, 1))
            return _relu_if(relu and not fuse, y.astype(out_dtype))
        return _relu_if(relu, ((x32 - mean) * self.running_scale() + self.bias[...])
                        .astype(out_dtype))

    def running_scale(self) -> jax.Array:
        """``scale / sqrt(running var + eps)``: eval mode's factor on ``x - running mean``."""
        return jax.lax.rsqrt(self.var[...] + self.epsilon) * self.scale[...]


def _relu_if(relu: bool, x: jax.Array) -> jax.Array:
    return nnx.relu(x) if relu else x


def _conv_bn(conv: nnx.Conv, bn: BatchNorm | None, x: jax.Array, *, relu: bool,
             residual: jax.Array | None = None) -> jax.Array:
    """``bn(conv(x))`` (just the convolution in nets without BatchNorm), plus ``residual``, then
    a ReLU if ``relu``. The CPU backend fuses what it can: the ReLU into train-mode BatchNorm
    where no residual comes between, and in eval mode BatchNorm, residual and ReLU into the fp32
    convolution (flaxres.ops.conv_batch_norm_eval). Same function either way."""
    if (bn is not None and bn.use_running_average and conv.bias is None
            and x.dtype == jnp.float32 and conv.dtype in (None, jnp.float32)
            and bn.dtype in (None, jnp.float32)):
        return ops.conv_batch_norm_eval(
            x, conv.kernel[...], conv.strides, conv.padding, conv.feature_group_count,
            bn.mean[...], bn.running_scale(), bn.bias[...], residual, relu=relu, cpu=bn.cpu_ops)
    y = conv(x)
    if bn is not None and residual is None:
        return bn(y, relu=relu)
    y = _maybe(bn, y)
    return _relu_if(relu, y if residual is None else y + residual)


class _KeyStream:
    """The ``rngs.params()`` that nnx layers draw their initial weights from, without an
    ``nnx.Rngs`` counter: under ``nnx.eval_shape`` (abstract models, to be filled with loaded
    weights) each draw from an ``nnx.Rngs`` updates a counter Variable, and flax 0.12's update
    scans the whole trace so far, which makes abstract builds of deep nets slow."""

    def __init__(self, key: jax.Array):
        self.key, self.drawn = key, 0

    def params(self) -> jax.Array:
        self.drawn += 1
        return jax.random.fold_in(self.key, self.drawn)


class _Layers:
    """Builds conv / norm layers with one dtype, norm choice and RNG stream for a whole net."""

    def __init__(self, *, norm: bool, bn_momentum: float, bn_eps: float, dtype,
                 param_dtype=jnp.float32, cpu_ops: ops.CpuOps = ops.CpuOps(), rngs: nnx.Rngs):
        self.norm, self.bn_momentum, self.bn_eps = norm, bn_momentum, bn_eps
        self.dtype, self.param_dtype, self.cpu_ops = dtype, param_dtype, cpu_ops
        self.rngs = _KeyStream(rngs.params())

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             bias: bool | None = None) -> nnx.Conv:
        # Symmetric padding k // 2 as PyTorch's padding=k//2; 'SAME' would pad asymmetrically at
        # stride 2. Without BatchNorm the conv carries a bias, as the no-BN PyTorch reference does.
        use_bias = (not self.norm) if bias is None else bias
        p = k // 2
        return nnx.Conv(cin, cout, (k, k), (stride, stride), padding=((p, p), (p, p)),
                        feature_group_count=groups, use_bias=use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        kernel_init=conv_kernel_init,
                        bias_init=_uniform_bias_init(cin // groups * k * k),
                        conv_general_dilated=ops.Conv(self.cpu_ops), rngs=self.rngs)

    def bn(self, features: int) -> BatchNorm | None:
        if not self.norm:
            return None
        return BatchNorm(features, momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype,
                         param_dtype=self.param_dtype, cpu_ops=self.cpu_ops)

    def linear(self, cin: int, cout: int) -> nnx.Linear:
        return nnx.Linear(cin, cout, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=linear_kernel_init,
                          bias_init=_uniform_bias_init(cin), rngs=self.rngs)


def _maybe(layer, x: jax.Array) -> jax.Array:
    return x if layer is None else layer(x)


def _bn_relu(bn: BatchNorm | None, x: jax.Array) -> jax.Array:
    """ReLU(BN(x)), fused on the CPU where it can be (just the ReLU in nets without BN)."""
    return nnx.relu(x) if bn is None else bn(x, relu=True)


def _preact(bn, x: jax.Array, projects: bool) -> tuple[jax.Array, jax.Array]:
    """BN-ReLU of a pre-activation block's input, and what its shortcut starts from: the
    normalised input where a projection follows, else the raw one."""
    out = _bn_relu(bn, x)
    return out, out if projects else x


class PadShortcut(nnx.Module):
    """Option A: parameter-free shortcut, stride-s subsampling and zero channel padding.

    Pads ``(cout - cin) // 2`` zero channels on each side, exactly as akamaster's
    ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))``.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        self.cin, self.cout, self.stride = cin, cout, stride

    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.stride  # a strided lax.slice: ONNX's Slice (indexing with steps is a gather)
        x = lax.slice(x, (0, 0, 0, 0), x.shape, (1, s, s, 1))
        lo = (self.cout - self.cin) // 2
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, self.cout - self.cin - lo)))


def _make_shortcut(L: _Layers, kind: Shortcut, cin: int, cout: int, stride: int,
                   preact: bool = False):
    """Returns ``(pad_shortcut, downsample)``; both None means identity (or no shortcut). A
    pre-activation block's projection is a bare conv: its input is already normalised."""
    reshapes = stride != 1 or cin != cout
    if kind == "A" and reshapes:
        return PadShortcut(cin, cout, stride), None
    if kind == "C" or (kind == "B" and reshapes):
        conv = L.conv(cin, cout, 1, stride)
        bn = None if preact else L.bn(cout)
        return None, nnx.Sequential(*([conv] if bn is None else [conv, bn]))
    return None, None


class BasicBlock(nnx.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets).

    ``preact``: He et al. 2016b's pre-activation order, BN-ReLU before each conv and nothing
    after the addition (kuangliu's ``PreActBlock``, the Wide ResNets' block); a projection then
    takes the pre-activated input, an identity the raw one. ``dropout``: the Wide ResNets'
    dropout between the two convs (pre-activation blocks only).
    """

    expansion = 1

    def __init__(self, L: _Layers, cin: int, planes: int, stride: int = 1, *,
                 shortcut: Shortcut = "B", groups: int = 1, base_width: int = 64,
                 preact: bool = False, dropout: float = 0.0):
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64 (as torchvision)")
        self.preact = preact
        self.bn1 = L.bn(cin if preact else planes)  # pre-activation: it normalises the input
        self.conv1 = L.conv(cin, planes, 3, stride)
        self.bn2 = L.bn(planes)
        self.dropout = nnx.Dropout(dropout) if dropout else None
        self.conv2 = L.conv(planes, planes, 3)
        self.has_shortcut = shortcut is not None
        self.pad_shortcut, self.downsample = _make_shortcut(L, shortcut, cin, planes, stride,
                                                            preact)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        if self.preact:
            out, shortcut_in = _preact(self.bn1, x, self.downsample is not None)
            out = _bn_relu(self.bn2, self.conv1(out))
            if self.dropout is not None:
                out = self.dropout(out, rngs=rngs)
            return self.conv2(out) + self._shortcut(shortcut_in)
        out = _conv_bn(self.conv1, self.bn1, x, relu=True)
        return _conv_bn(self.conv2, self.bn2, out, relu=True, residual=self._shortcut(x))

    def _shortcut(self, x: jax.Array) -> jax.Array | None:
        """What the block adds before its last ReLU (None in a plain net)."""
        if not self.has_shortcut:
            return None
        if self.downsample is not None:  # the projection's BatchNorm fuses like the others'
            conv, *bn = self.downsample.layers
            return _conv_bn(conv, bn[0] if bn else None, x, relu=False)
        return _maybe(self.pad_shortcut, x)


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (stride and groups here, torchvision's "v1.5"), 1x1 expand x4.

    ResNeXt is this block with ``groups`` (cardinality) and ``base_width`` (width per group).
    """

    expansion = 4

    def __init__(self, L: _Layers, cin: int, planes: int, stride: int = 1, *,
                 shortcut: Shortcut = "B", groups: int = 1, base_width: int = 64,
                 preact: bool = False, dropout: float = 0.0):
        if dropout:
            raise ValueError("dropout is a Wide ResNet option of pre-activation BasicBlocks")
        width = int(planes * (base_width / 64.0)) * groups
        cout = planes * self.expansion
        self.preact = preact
        # Pre-activation: each BN normalises its conv's input, so it has the input's width.
        self.bn1 = L.bn(cin if preact else width)
        self.conv1 = L.conv(cin, width, 1)
        self.conv2 = L.conv(width, width, 3, stride, groups)
        self.bn2 = L.bn(width)
        self.conv3 = L.conv(width, cout, 1)
        self.bn3 = L.bn(width if preact else cout)
        self.has_shortcut = shortcut is not None
        self.pad_shortcut, self.downsample = _make_shortcut(L, shortcut, cin, cout, stride,
                                                            preact)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        if self.preact:
            out, shortcut_in = _preact(self.bn1, x, self.downsample is not None)
            out = self.conv2(_bn_relu(self.bn2, self.conv1(out)))
            out = self.conv3(_bn_relu(self.bn3, out))
            return out + self._shortcut(shortcut_in)
        out = _conv_bn(self.conv1, self.bn1, x, relu=True)
        out = _conv_bn(self.conv2, self.bn2, out, relu=True)
        return _conv_bn(self.conv3, self.bn3, out, relu=True, residual=self._shortcut(x))


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """PyTorch's ``MaxPool2d(3, stride=2, padding=1)``: the padding is -inf, so it never wins. It
    is padded explicitly, because jax2onnx's ONNX form of ``nnx.max_pool`` drops the pool's own
    padding argument."""
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2))


class ResNet(nnx.Module):
    """Stem, stages of blocks (first stage stride 1, the others stride 2), global pool, fc.

    Args:
      block: ``BasicBlock`` or ``Bottleneck``.
      layers: blocks per stage, e.g. ``(3, 3, 3)`` for ResNet-20, ``(3, 4, 6, 3)`` for ResNet-50.
      widths: planes per stage (block output is ``planes * block.expansion``).
      stem: ``"cifar"`` (3x3 conv, stride 1) or ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool).
      stem_width: channels after the stem.
      shortcut: ``"A"`` zero-pad, ``"B"`` projection where the shape changes, ``"C"`` projection
        everywhere, ``None`` for a plain net without shortcuts.
      norm: ``False`` drops every BatchNorm (convs then carry biases), for the degradation study.
      groups, width_per_group: ResNeXt cardinality and bottleneck width.
      dtype: computation dtype (``jnp.float32`` or ``jnp.bfloat16``).
      param_dtype: parameter and BatchNorm-statistics dtype (fp32; ``jnp.float64`` under
        ``jax.enable_x64`` for float64 parity checks, with ``dtype=jnp.float64``).
      bn_momentum, bn_eps: PyTorch conventions (new = (1 - m) * old + m * batch).
      cpu_ops: which CPU fast paths the traced program uses on the CPU platform
        (:class:`flaxres.ops.CpuOps`; ``CpuOps.off()`` for plain ``lax``); other platforms
        always run plain ``lax``.
      preact: pre-activation blocks (He et al. 2016b): the stem is a bare conv, and
        ``head_norm`` adds the final BN-ReLU before the pool (the paper's and the Wide ResNets';
        kuangliu's PreActResNet18 has none).
      dropout: the Wide ResNets' dropout rate inside each pre-activation BasicBlock; a model
        with dropout needs ``rngs`` when called in train mode.
    """

    def __init__(self, block: type[BasicBlock], layers: Sequence[int], widths: Sequence[int], *,
                 num_classes: int = 10, stem: Stem = "cifar", stem_width: int = 16,
                 shortcut: Shortcut = "A", norm: bool = True, groups: int = 1,
                 width_per_group: int = 64, in_channels: int = 3, dtype=jnp.float32,
                 param_dtype=jnp.float32, bn_momentum: float = 0.1, bn_eps: float = 1e-5,
                 cpu_ops: ops.CpuOps = ops.CpuOps(), preact: bool = False,
                 head_norm: bool = False, dropout: float = 0.0, rngs: nnx.Rngs):
        if shortcut not in ("A", "B", "C", None):
            raise ValueError(f"shortcut must be 'A', 'B', 'C' or None (plain net), got {shortcut!r}")
        if preact and shortcut is None:
            raise ValueError("a pre-activation net needs its shortcuts (shortcut='B')")
        if not 0 <= dropout < 1 or (dropout and not preact):
            raise ValueError(f"dropout={dropout}: a rate in [0, 1) of pre-activation blocks")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        L = _Layers(norm=norm, bn_momentum=bn_momentum, bn_eps=bn_eps, dtype=dtype,
                    param_dtype=param_dtype, cpu_ops=cpu_ops, rngs=rngs)
        self.in_channels, self.stem, self.dtype, self.preact = in_channels, stem, dtype, preact
        k = 7 if stem == "imagenet" else 3
        self.conv1 = L.conv(in_channels, stem_width, k, 2 if stem == "imagenet" else 1)
        self.bn1 = None if preact else L.bn(stem_width)  # pre-activation: the blocks normalise
        cin = stem_width
        for i, (n, planes) in enumerate(zip(layers, widths, strict=True)):
            stage = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(block(L, cin, planes, stride, shortcut=shortcut, groups=groups,
                                   base_width=width_per_group, preact=preact, dropout=dropout))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(stage))
        self.num_stages = len(layers)
        self.num_features = cin
        self.bn = L.bn(cin) if preact and head_norm else None  # the final BN-ReLU
        self.fc = L.linear(cin, num_classes)
        stem_reduction = 4 if stem == "imagenet" else 1  # the max-pool belongs to the stem
        self.feature_info = (FeatureInfo("stem", stem_width, stem_reduction), *(
            FeatureInfo(f"layer{i + 1}", w * block.expansion, stem_reduction * 2 ** i)
            for i, w in enumerate(widths)))

    def stages(self) -> list[nnx.List]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def check_input(self, x: jax.Array) -> None:
        """Fails with the expected NHWC shape before XLA sees a malformed input."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"expected an NHWC batch of shape (N, H, W, {self.in_channels}), got shape "
                f"{tuple(x.shape)}; PyTorch's NCHW arrays need x.transpose(0, 2, 3, 1)")
        min_hw = 2 ** (self.num_stages - 1) * (4 if self.stem == "imagenet" else 1)
        if x.shape[1] < min_hw or x.shape[2] < min_hw:
            raise ValueError(f"input spatial size {x.shape[1:3]} is too small: this net "
                             f"downsamples by {min_hw}; use at least {min_hw}x{min_hw}")

    def forward_stem(self, x: jax.Array) -> jax.Array:
        """The stem's output: the first convolution (with its BN-ReLU unless pre-activation) and
        the ImageNet stem's max pool."""
        self.check_input(x)
        x = x.astype(self.dtype)
        x = self.conv1(x) if self.preact else _conv_bn(self.conv1, self.bn1, x, relu=True)
        return max_pool_3x3_s2(x) if self.stem == "imagenet" else x

    def blocks(self) -> list[BasicBlock]:
        """Every residual block, in order through the stages."""
        return [blk for stage in self.stages() for blk in stage]

    def features(self, x: jax.Array, every_block: bool = False,
                 rngs: nnx.Rngs | None = None) -> list[jax.Array]:
        """Stem output and each stage's output, for per-stage parity checks; with
        ``every_block`` each block's output instead of each stage's, so a study can follow the
        activations through the depth of the net (``train.probe``). ``rngs`` draws dropout."""
        x = self.forward_stem(x)
        outs = [x]
        for stage in self.stages():
            for blk in stage:
                x = blk(x, rngs)
                if every_block:
                    outs.append(x)
            if not every_block:
                outs.append(x)
        return outs

    def forward_features(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """The last stage's feature map, before pooling (timm's name); after the final BN-ReLU
        of a pre-activation net that has one."""
        return self.head_norm(self.features(x, rngs=rngs)[-1])

    def head_norm(self, x: jax.Array) -> jax.Array:
        """A pre-activation net's final BN-ReLU (identity where it has none)."""
        return x if self.bn is None else _bn_relu(self.bn, x)

    def forward_head(self, x: jax.Array, *, pre_logits: bool = False) -> jax.Array:
        """Global average pool and classifier of a :meth:`forward_features` map;
        ``pre_logits=True`` stops at the pooled ``(N, num_features)`` embedding."""
        pooled = x.mean(axis=(1, 2))
        if pre_logits:
            return pooled
        return self.fc(pooled).astype(ops.accumulation_dtype(self.dtype))

    def forward_intermediates(self, x: jax.Array, indices: int | Sequence[int] | None = None
                              ) -> tuple[jax.Array, list[jax.Array]]:
        """``(logits, feature maps)`` from one pass, for transfer learning and dense heads.

        The maps are the stem's and each stage's NHWC outputs, described by
        :attr:`feature_info`; ``indices`` picks some: an int ``n`` the last ``n``, a sequence
        those positions (negative ones count from the end). Unlike timm's method of the same
        name, the first element is the logits, not the unpooled last map.
        """
        feats = self.features(x)
        last = self.head_norm(feats[-1])
        if indices is None:
            take = list(range(len(feats)))
        elif isinstance(indices, int):
            if not 0 < indices <= len(feats):
                raise ValueError(f"indices={indices}: this net has {len(feats)} feature maps")
            take = list(range(len(feats) - indices, len(feats)))
        else:
            bad = [i for i in indices if not -len(feats) <= i < len(feats)]
            if bad:
                raise ValueError(f"indices {bad} out of range: this net has {len(feats)} "
                                 "feature maps (stem and stages)")
            take = list(indices)
        return self.forward_head(last), [feats[i] for i in take]

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.forward_head(self.forward_features(x, rngs))
