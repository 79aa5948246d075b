"""Deployed-integer check: a quantized model exported to ONNX with QuantizeLinear/DequantizeLinear
(QDQ) pairs that carry exactly its scales and zero-points, executed by ONNX Runtime's integer
kernels on CPU, and compared with the fake-quant simulation (``deploy=onnxruntime``).

What ``export`` writes for each quantized Conv/Linear (``QuantLayer``):

- input: QuantizeLinear -> [Clip on the integer levels when the grid is narrower than 8 bits] ->
  DequantizeLinear, per tensor, always uint8. A signed grid [qmin, qmax] with zero-point z is
  written as the uint8 grid [qmin + 128, qmax + 128] with zero-point z + 128 (the same values), so
  every kernel runs ORT's u8s8 path. Any grid of b <= 8 bits fits with the same scale.
- weights: an int8 initializer holding exactly ``QuantLayer.weight_levels()``, the per-channel
  (axis 0) or per-tensor scale and integer zero-point, and a DequantizeLinear.
- bias: int32 at scale s_x * s_w[c] with zero-point 0 where the input is quantized (the simulation
  keeps the bias in float: rounding it moves each output by at most half a product step).

ORT's optimizer fuses DQ -> Conv -> Q into QLinearConv (integer in, integer out) only where the
conv's output goes straight into a QuantizeLinear. In the simulation a conv output is requantized
only where it reaches the next layer's input quantizer; the exporter drops a ReLU/ReLU6 between
the two when the quantizer's clamp makes it redundant (zero-point at the bottom of the grid: exact),
so those convs fuse; a max pooling in between runs on the uint8 levels (it commutes with the
quantizer). A conv whose output the simulation does NOT requantize (it feeds a residual
add, an average pooling, an unfolded BN, two different quantizers, the logits) would stay a float Conv on
dequantized tensors in ORT; the exporter writes those as ConvInteger (exact integer accumulation;
with the per-channel weight zero-point subtracted in int32) + int32 bias + one float rescale by
s_x * s_w[c], which is the simulation's arithmetic. ``conv_integer=False`` keeps them as plain QDQ.
Linear layers stay DQ -> Gemm, which ORT fuses into QGemm (float or uint8 output).

Where the integer model parts from the simulation (all small, measured in the row):
- fused QLinearConv/QGemm requantize their int32 accumulator straight to the next layer's levels
  (one multiplier per channel), where the simulation rounds a float conv output: a level can differ
  by one at near-ties; the bias is rounded to int32 (above);
- QuantizeLinear divides by the scale, torch's fake-quant multiplies by its float reciprocal:
  values within an ulp of a rounding tie can land one level apart.
Layers the simulation keeps in float stay float ops in ORT (a layer with w_bits=None, an unquantized
first-layer input, BN not folded, residual adds, pooling). Protocol choices that cannot be expressed
raise ``ExportError`` naming them: more than 8 weight or activation bits, an activation quantizer
that is not calibrated, weights that are not on their grid.

The graph is built with the ``onnx`` helper API from a torch.fx trace of the model (QuantLayer and
Conv/Linear/BN kept as leaves), not with torch.onnx.export: the QDQ nodes and initializers are
written directly from the QuantLayer buffers, so nothing in between can re-round or re-type them.
Supported float ops (``_GraphBuilder.EMITTERS``, one entry per op): BN, ReLU, ReLU6/Hardtanh,
Sigmoid, SiLU, Hardswish, Hardsigmoid, Tanh, add, sub, mul, div, cat, max/avg pooling, adaptive
average pooling, flatten, view/reshape, mean, identity/dropout; anything else fails with the op's name.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from dfq_bench.core.modules import ActQuant, QuantLayer
from dfq_bench.graph import BATCHNORM, LeafTracer, TraceError, activation_kind

log = logging.getLogger(__name__)

OPSET, IR_VERSION = 17, 8  # IR 8 = opset 17's; onnx's newer default IR is beyond what ORT 1.2x loads
MAX_BITS = 8
INTEGER_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearConcat",
               "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearMul", "QLinearSigmoid")
FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


class ExportError(ValueError):
    """A model or protocol choice that the integer export cannot express (one-line message)."""


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("deploy needs the `onnx` package: pip install -e '.[deploy]'") from None
    return onnx


def _require_ort():
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("deploy=onnxruntime needs onnxruntime: pip install -e '.[deploy]'") from None
    return onnxruntime


# ---------------------------------------------------------------------------------------------
# quantization parameters as the ONNX graph holds them


@dataclass(frozen=True)
class ActParams:
    """A per-tensor activation grid re-encoded on uint8 (see the module docstring)."""

    scale: float
    zero_point: int  # uint8
    qmin: int  # uint8 levels
    qmax: int

    @property
    def narrow(self) -> bool:
        return (self.qmin, self.qmax) != (0, 255)


def act_params(name: str, aq: ActQuant) -> ActParams:
    if aq.bits > MAX_BITS:
        raise ExportError(f"cannot export layer {name!r} for integer execution: its input has "
                          f"a_bits={aq.bits} (abits / protocol.last_abits); integer kernels take at most "
                          f"{MAX_BITS}-bit activations")
    if aq.state != "on":
        raise ExportError(f"cannot export layer {name!r}: its activation quantizer is {aq.state!r}, "
                          "not calibrated ('on')")
    if getattr(aq, "granularity", "per_tensor") != "per_tensor":  # validate_config refuses such runs; the API not
        raise ExportError(f"cannot export layer {name!r} for integer execution: its activation ranges are "
                          f"{aq.granularity} (protocol.a_granularity); the exported QuantizeLinear takes one fixed "
                          "scale per tensor")
    shift = 128 if aq.qmin < 0 else 0
    zp = int(aq.zero_point) + shift
    qmin, qmax = aq.qmin + shift, aq.qmax + shift
    if not 0 <= qmin <= zp <= qmax <= 255:
        raise ExportError(f"cannot export layer {name!r}: activation grid [{aq.qmin}, {aq.qmax}] with "
                          f"zero-point {int(aq.zero_point)} does not fit uint8")
    return ActParams(float(aq.scale), zp, qmin, qmax)


def weight_params(name: str, ql: QuantLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int8 levels, float32 scale, int8 zero-point); scale/zero-point of shape (O,) or ()."""
    if ql.w_bits > MAX_BITS:
        raise ExportError(f"cannot export layer {name!r} for integer execution: w_bits={ql.w_bits} "
                          f"(wbits / protocol.first_wbits / last_wbits); integer kernels take at most "
                          f"{MAX_BITS}-bit weights")
    kind = getattr(ql, "w_grid_kind", "uniform")
    if kind != "uniform":
        raise ExportError(f"cannot export layer {name!r} for integer execution: its weight grid is {kind}, not "
                          "a uniform grid (PowerQuant, REx); integer kernels take uniform grids")
    levels = ql.weight_levels().detach()
    scale, zp = ql.w_scale.detach(), ql.w_zero_point.detach()
    back = (levels - zp) * scale
    step = scale.expand_as(levels)
    if (levels < ql.w_qmin).any() or (levels > ql.w_qmax).any() or \
            ((back - ql.layer.weight.detach()).abs() > 1e-3 * step).any():
        raise ExportError(f"cannot export layer {name!r}: its weights are not on their quantization grid "
                          "(w_scale / w_zero_point); the method changed them after rounding")
    if (zp < -128).any() or (zp > 127).any():
        raise ExportError(f"cannot export layer {name!r}: a weight zero-point ({int(zp.min())}..{int(zp.max())}) "
                          "does not fit int8 (protocol.w_range=minmax); valid for integer execution: "
                          "protocol.w_range=include_zero")
    per_channel = scale.numel() > 1
    s = scale.reshape(-1) if per_channel else scale.reshape(())
    z = zp.reshape(-1) if per_channel else zp.reshape(())
    return (levels.cpu().numpy().astype(np.int8), s.cpu().numpy().astype(np.float32),
            z.cpu().numpy().round().astype(np.int8))


# ---------------------------------------------------------------------------------------------
# graph building


class _Tracer(LeafTracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantLayer) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:
        raise TraceError(f"cannot trace {type(model).__name__} with torch.fx: {e}") from e
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    _drop_identities(gm)
    return gm


_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)


def _drop_identities(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(m, _IDENTITY_MODULES) or (node.op == "call_function" and node.target is F.dropout) \
                or (node.op == "call_method" and node.target == "contiguous"):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _pair(v, n: int) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v)] * n


def _conv_attrs(conv: nn.Module) -> dict:
    if type(conv).forward not in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
        raise ExportError(f"cannot export {type(conv).__name__}: a conv subclass with its own forward")
    if conv.padding_mode != "zeros":
        raise ExportError(f"cannot export a conv with padding_mode={conv.padding_mode!r}; valid: 'zeros'")
    nd = conv.weight.dim() - 2
    if conv.padding == "same":  # stride 1: total padding d*(k-1), the extra one at the end as torch does
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        pads = 2 * ([0] * nd if conv.padding == "valid" else _pair(conv.padding, nd))
    return {"kernel_shape": list(conv.kernel_size), "strides": _pair(conv.stride, nd),
            "dilations": _pair(conv.dilation, nd), "group": conv.groups, "pads": pads}


def _unary(op_type: str, **attrs):  # the emitter of a one-input op without weights
    return lambda self, node, m, ins, base: self.op(op_type, ins[:1], base, **attrs)


_BINARY = {operator.add: "Add", torch.add: "Add", operator.iadd: "Add", "add": "Add",
           operator.sub: "Sub", torch.sub: "Sub", "sub": "Sub", operator.mul: "Mul", torch.mul: "Mul",
           "mul": "Mul", operator.truediv: "Div", torch.div: "Div", "div": "Div"}


class _GraphBuilder:
    """Translates a traced model into ONNX nodes and initializers."""

    def __init__(self, gm: fx.GraphModule, conv_integer: bool, requantize: bool):
        from onnx import helper, numpy_helper

        self.h, self.nh = helper, numpy_helper
        self.gm, self.conv_integer, self.requantize = gm, conv_integer, requantize
        self.nodes, self.inits, self.used = [], [], set()
        self.value: dict[fx.Node, str] = {}
        self.qcache: dict[tuple, tuple[str, str]] = {}  # (tensor node, params) -> (levels, dequantized)
        self.skip: set[fx.Node] = set()  # activations dropped in front of a requantizing quantizer
        self.requant: dict[fx.Node, tuple[fx.Node, ActParams]] = {}
        self.stats = {"n_quant_layers": 0, "n_requantized": 0, "n_conv_integer": 0, "n_float_layers": 0}
        self.act_levels: dict[str, str] = {}  # layer -> name of its uint8 input levels

    # -- naming and emission
    def fresh(self, base: str) -> str:
        base = base.replace("/", ".") or "v"
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def const(self, base: str, array) -> str:
        name = self.fresh(base)
        self.inits.append(self.nh.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.fresh(base)
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=self.fresh(f"{base}.{op_type}"),
                                           **attrs))
        return out

    # -- activation quantization
    def quantize(self, src: fx.Node, p: ActParams, x: str, base: str, pools=()) -> tuple[str, str]:
        """(uint8 levels, dequantized) of tensor ``src`` (float value ``x``) on grid ``p``; one QDQ
        per (tensor, grid), shared by every layer that quantizes the same tensor the same way.
        ``pools``: max-pooling nodes between ``x`` and ``src``, applied to the levels."""
        key = (src, p)
        if key not in self.qcache:
            if x is None:
                raise ExportError(f"{src.name} is read on two different grids; cannot share its requantization")
            s = self.const(f"{base}.x_scale", np.float32(p.scale))
            z = self.const(f"{base}.x_zero_point", np.uint8(p.zero_point))
            q = self.op("QuantizeLinear", [x, s, z], f"{base}.x_q")
            for pool in pools:
                q = self.pool(pool, _module(self.gm, pool), q, f"{base}.x_q_{pool.name}")
            if p.narrow:
                q = self.op("Clip", [q, self.const(f"{base}.x_qmin", np.uint8(p.qmin)),
                                     self.const(f"{base}.x_qmax", np.uint8(p.qmax))], f"{base}.x_q_clip")
            self.qcache[key] = (q, self.op("DequantizeLinear", [q, s, z], f"{base}.x_dq"))
        return self.qcache[key]

    # -- requantization: which quantized layers feed the next input quantizer directly
    def plan_requant(self) -> None:
        if not self.requantize:
            return
        for node in self.gm.graph.nodes:
            ql = _module(self.gm, node)
            if not isinstance(ql, QuantLayer) or not self._integer_layer(ql):
                continue
            cur, chain = node, []
            while len(cur.users) == 1:
                nxt = next(iter(cur.users))
                if nxt.args[0] is not cur or (self._clamp(nxt) is None and not self._max_pool(nxt)):
                    break
                chain.append(nxt)
                cur = nxt
            users = list(cur.users)
            grids = set()
            for u in users:
                m = _module(self.gm, u)
                if not (isinstance(m, QuantLayer) and u.args[0] is cur and m.act_quant is not None):
                    break
                grids.add(act_params(u.target, m.act_quant))
            else:
                if len(grids) == 1:
                    p = grids.pop()
                    if all(self._max_pool(a) or self._redundant(a, p) for a in chain):
                        self.requant[node] = (cur, p, [a for a in chain if self._max_pool(a)])
                        self.skip.update(chain)

    def _max_pool(self, node: fx.Node) -> bool:
        """Max pooling commutes with the (monotone) quantizer: it runs on the uint8 levels."""
        m = _module(self.gm, node)
        if isinstance(m, nn.MaxPool2d):
            return not m.return_indices
        return node.op == "call_function" and node.target is F.max_pool2d and not _arg(node, 6, "return_indices")

    def _clamp(self, node: fx.Node) -> tuple[float, float] | None:
        kind, m = activation_kind(self.gm, node), _module(self.gm, node)
        if kind == "relu":
            return 0.0, float("inf")
        if kind == "relu6":
            return (m.min_val, m.max_val) if isinstance(m, nn.Hardtanh) else (0.0, 6.0)
        return None

    def _redundant(self, act: fx.Node, p: ActParams) -> bool:
        """A clamp to [0, hi] in front of quantizer ``p`` changes no level: the quantizer's own
        clamp at qmin maps every negative value to the level of 0 (zero-point == qmin), and every
        value above hi to qmax already (hi >= (qmax - zp - 1/2) * scale)."""
        lo, hi = self._clamp(act)
        return lo == 0.0 and p.zero_point == p.qmin and hi >= (p.qmax - p.zero_point - 0.5) * p.scale

    @staticmethod
    def _integer_layer(ql: QuantLayer) -> bool:
        aq = ql.act_quant
        return ql.w_bits is not None and aq is not None and aq.state != "off"

    # -- layers
    def quant_layer(self, node: fx.Node, ql: QuantLayer) -> str:
        name, layer = node.target, ql.layer
        src = node.args[0]
        x = self.value.get(src)  # None where the producer's float output was requantized directly
        xq = p = None
        if ql.act_quant is not None and ql.act_quant.state != "off":
            p = act_params(name, ql.act_quant)
            xq, x = self.quantize(src, p, x, name)
            self.act_levels[name] = xq
        if ql.w_bits is None:
            self.stats["n_float_layers"] += 1
            return self.float_layer(node, layer, x)
        levels, w_scale, w_zp = weight_params(name, ql)
        self.stats["n_quant_layers"] += 1
        is_conv = not isinstance(layer, nn.Linear)
        bias = None if layer.bias is None else layer.bias.detach().cpu().numpy().astype(np.float64)
        if p is None:
            self.stats["n_float_layers"] += 1
        requant = self.requant.get(node)
        if p is not None and is_conv and requant is None and self.conv_integer:
            self.stats["n_conv_integer"] += 1
            return self.conv_integer_layer(name, layer, xq, p, levels, w_scale, w_zp, bias)
        wq = self.const(f"{name}.w_q", levels)
        ws = self.const(f"{name}.w_scale", w_scale)
        wz = self.const(f"{name}.w_zero_point", w_zp)
        inputs = [x, self.op("DequantizeLinear", [wq, ws, wz], f"{name}.w_dq", axis=0)]
        if bias is not None:
            if p is None:
                inputs.append(self.const(f"{name}.bias", bias.astype(np.float32)))
            else:
                b_scale = _product_scale(p, w_scale)
                b_q = self.const(f"{name}.b_q", _int32_bias(name, bias, b_scale, len(bias)))
                inputs.append(self.op("DequantizeLinear", [b_q, self.const(f"{name}.b_scale", b_scale),
                                                           self.const(f"{name}.b_zero_point",
                                                                      np.zeros(b_scale.shape, np.int32))],
                                      f"{name}.b_dq", axis=0))
        y = self._float_compute(node, layer, inputs, name)
        if requant is not None:
            tensor, q, pools = requant
            self.stats["n_requantized"] += 1
            self.quantize(tensor, q, y, tensor.target if tensor.op == "call_module" else tensor.name, pools)
        return y

    def _float_compute(self, node: fx.Node, layer: nn.Module, inputs: list[str], base: str) -> str:
        if isinstance(layer, nn.Linear):
            shape = node.args[0].meta["tensor_meta"].shape if "tensor_meta" in node.args[0].meta else None
            if shape is not None and len(shape) != 2:
                raise ExportError(f"cannot export Linear {base!r} on a {len(shape)}-d input; valid: (N, features)")
            return self.op("Gemm", inputs, f"{base}.out", transB=1)
        return self.op("Conv", inputs, f"{base}.out", **_conv_attrs(layer))

    def float_layer(self, node: fx.Node, layer: nn.Module, x: str) -> str:
        base = node.target if node.op == "call_module" else node.name
        inputs = [x, self.const(f"{base}.weight", layer.weight.detach().cpu().numpy().astype(np.float32))]
        if layer.bias is not None:
            inputs.append(self.const(f"{base}.bias", layer.bias.detach().cpu().numpy().astype(np.float32)))
        return self._float_compute(node, layer, inputs, base)

    def conv_integer_layer(self, name, layer, xq, p: ActParams, levels, w_scale, w_zp, bias) -> str:
        """ConvInteger on the uint8 levels: exact int32 accumulation of (x - z_x)(w - z_w[c]).

        ORT's ConvInteger takes only a per-tensor weight zero-point, so z_w[c] is subtracted here:
        from the weights when (w - z_w[c]) fits int8 (always for b <= 7 bits), else in int32 as
        z_w[c] * (sum of (x - z_x) over the receptive field), a ConvInteger with an all-ones kernel.
        """
        attrs = _conv_attrs(layer)
        out_ch, nd = levels.shape[0], levels.ndim - 2
        bshape = (1, -1) + (1,) * nd
        zp = w_zp.astype(np.int32).reshape(-1, *([1] * (nd + 1)))
        xz = self.const(f"{name}.x_zero_point_ci", np.uint8(p.zero_point))
        shifted = levels.astype(np.int32) - zp
        if shifted.min() >= -128 and shifted.max() <= 127:
            acc = self.op("ConvInteger", [xq, self.const(f"{name}.w_q_shifted", shifted.astype(np.int8)), xz],
                          f"{name}.acc", **attrs)
        else:
            acc = self.op("ConvInteger", [xq, self.const(f"{name}.w_q", levels), xz], f"{name}.acc0", **attrs)
            groups = attrs["group"]
            ones_out = 1 if groups == 1 else (groups if out_ch == groups else out_ch)
            ones = np.ones((ones_out, levels.shape[1], *levels.shape[2:]), np.int8)
            box = self.op("ConvInteger", [xq, self.const(f"{name}.ones", ones), xz], f"{name}.boxsum", **attrs)
            corr = self.op("Mul", [box, self.const(f"{name}.w_zero_point_i32",
                                                   w_zp.astype(np.int32).reshape(bshape))], f"{name}.zp_corr")
            acc = self.op("Sub", [acc, corr], f"{name}.acc")
        # the grid itself, unused by the nodes above, so that every layer's file record is the same
        self.const(f"{name}.w_scale", w_scale)
        self.const(f"{name}.w_zero_point", w_zp)
        scale = _product_scale(p, w_scale)
        if bias is not None:
            b = _int32_bias(name, bias, scale, out_ch).reshape(bshape)
            acc = self.op("Add", [acc, self.const(f"{name}.b_q", b)], f"{name}.acc_b")
        y = self.op("Cast", [acc], f"{name}.acc_f", to=1)  # FLOAT
        return self.op("Mul", [y, self.const(f"{name}.out_scale", scale.reshape(bshape) if scale.ndim
                                             else scale)], f"{name}.out")

    # -- everything else: one emitter per op, found in EMITTERS (below)
    def float_op(self, node: fx.Node) -> str:
        m = _module(self.gm, node)
        first = node.args[0] if node.args else None
        ins = [self._input(first, node)] if isinstance(first, fx.Node) else []
        base = node.target if node.op == "call_module" else node.name
        keys = type(m).__mro__ if m is not None else (node.target,)  # a module: its class, then its bases
        emit = next((self.EMITTERS[k] for k in keys if k in self.EMITTERS), None)
        if emit is None:
            what = type(m).__name__ if m is not None else getattr(node.target, "__name__", str(node.target))
            raise ExportError(f"cannot export op {what!r} (node {node.name}) to ONNX: "
                              "not supported by dfq_bench.deploy")
        return emit(self, node, m, ins, base)

    def _input(self, a, user: fx.Node) -> str:
        if a not in self.value:
            raise ExportError(f"node {user.name} reads {a.name}, whose float value the export dropped")
        return self.value[a]

    # each emitter: (node, its module or None, [value of its first input] or [], base name) -> output value
    def batch_norm(self, node, m, ins, base) -> str:
        arrs = [m.weight if m.affine else torch.ones_like(m.running_mean),
                m.bias if m.affine else torch.zeros_like(m.running_mean), m.running_mean, m.running_var]
        consts = [self.const(f"{base}.{k}", a.detach().cpu().numpy().astype(np.float32))
                  for k, a in zip(("scale", "bias", "mean", "var"), arrs, strict=True)]
        return self.op("BatchNormalization", [ins[0], *consts], base, epsilon=float(m.eps))

    def clip(self, node, m, ins, base) -> str:
        lo, hi = (m.min_val, m.max_val) if isinstance(m, nn.Hardtanh) else (0.0, 6.0)
        return self.op("Clip", [ins[0], self.const(f"{base}.min", np.float32(lo)),
                                self.const(f"{base}.max", np.float32(hi))], base)

    def pool(self, node, m, x, base) -> str:
        get = (lambda k, i, d=None: getattr(m, k)) if m is not None else \
            (lambda k, i, d=None: _arg(node, i, k, d))
        k = _pair(get("kernel_size", 1), 2)
        stride = get("stride", 2) or k
        attrs = {"kernel_shape": k, "strides": _pair(stride, 2), "pads": _pair(get("padding", 3, 0), 2) * 2}
        is_max = isinstance(m, nn.MaxPool2d) or node.target is F.max_pool2d
        if is_max:
            if get("return_indices", 6, False):
                raise ExportError(f"cannot export max pooling with return_indices ({base})")
            attrs.update(dilations=_pair(get("dilation", 4, 1), 2), ceil_mode=int(get("ceil_mode", 5, False)))
            return self.op("MaxPool", [x], base, **attrs)
        if get("divisor_override", 6, None) is not None:
            raise ExportError(f"cannot export average pooling with divisor_override ({base})")
        attrs.update(ceil_mode=int(get("ceil_mode", 4, False)),
                     count_include_pad=int(get("count_include_pad", 5, True)))
        return self.op("AveragePool", [x], base, **attrs)

    def adaptive_pool(self, node, m, ins, base) -> str:
        size = _pair(m.output_size if m is not None else _arg(node, 1, "output_size"), 2)
        if size == [1, 1]:
            return self.op("GlobalAveragePool", ins[:1], base)
        hw = list(node.args[0].meta["tensor_meta"].shape[2:])
        if all(s is not None and h % s == 0 for h, s in zip(hw, size, strict=True)):
            k = [h // s for h, s in zip(hw, size, strict=True)]
            return self.op("AveragePool", ins[:1], base, kernel_shape=k, strides=k)
        raise ExportError(f"cannot export adaptive average pooling {hw} -> {size} ({base}): not a whole window")

    def reshape(self, node, m, ins, base) -> str:
        shape_in = node.args[0].meta["tensor_meta"].shape
        shape_out = node.meta["tensor_meta"].shape
        if len(shape_out) == 2 and shape_out[0] == shape_in[0]:
            return self.op("Flatten", ins[:1], base, axis=1)
        if shape_out[0] != shape_in[0]:
            raise ExportError(f"cannot export reshape {tuple(shape_in)} -> {tuple(shape_out)} ({base}): "
                              "it mixes the batch")
        return self.op("Reshape", [ins[0], self.const(f"{base}.shape", np.array([0, *shape_out[1:]], np.int64))],
                       base)

    def binary(self, node, m, ins, base) -> str:
        if node.kwargs.get("alpha", 1) != 1:
            raise ExportError(f"cannot export add/sub with alpha ({base})")
        inputs = [self._input(a, node) if isinstance(a, fx.Node) else self.const(f"{base}.c", np.float32(a))
                  for a in node.args[:2]]
        return self.op(_BINARY[node.target], inputs, base)

    def mean(self, node, m, ins, base) -> str:
        dims = _arg(node, 1, "dim")
        return self.op("ReduceMean", ins[:1], base, axes=[dims] if isinstance(dims, int) else list(dims),
                       keepdims=int(bool(_arg(node, 2, "keepdim", False))))

    # Op -> emitter: a module class (it also covers its subclasses; the first class of a module's MRO
    # found here wins), a function (call_function target) or a method name (call_method target).
    EMITTERS = {
        **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear),
                        lambda self, node, m, ins, base: self.float_layer(node, m, ins[0])),
        **dict.fromkeys(BATCHNORM, batch_norm),
        **dict.fromkeys((nn.ReLU, F.relu, torch.relu, "relu"), _unary("Relu")),
        **dict.fromkeys((nn.Hardtanh, F.relu6), clip),  # nn.ReLU6 is a Hardtanh
        **dict.fromkeys((nn.Sigmoid, torch.sigmoid), _unary("Sigmoid")),
        **dict.fromkeys((nn.Tanh, torch.tanh), _unary("Tanh")),
        **dict.fromkeys((nn.Hardswish, F.hardswish), _unary("HardSwish")),
        **dict.fromkeys((nn.Hardsigmoid, F.hardsigmoid), _unary("HardSigmoid", alpha=1.0 / 6.0, beta=0.5)),
        **dict.fromkeys((nn.SiLU, F.silu), lambda self, node, m, ins, base: self.op(
            "Mul", [ins[0], self.op("Sigmoid", ins[:1], f"{base}.sigmoid")], base)),
        **dict.fromkeys((nn.MaxPool2d, nn.AvgPool2d, F.max_pool2d, F.avg_pool2d),
                        lambda self, node, m, ins, base: self.pool(node, m, ins[0], base)),
        **dict.fromkeys((nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d), adaptive_pool),
        **dict.fromkeys((nn.Flatten, torch.flatten, "flatten", "view", "reshape"), reshape),
        **dict.fromkeys(_BINARY, binary),
        torch.cat: lambda self, node, m, ins, base: self.op(
            "Concat", [self._input(t, node) for t in node.args[0]], base, axis=int(_arg(node, 1, "dim", 0))),
        **dict.fromkeys((torch.mean, "mean"), mean),
    }

    # -- the whole graph
    def build(self, input_name: str = "input", output_name: str = "logits"):
        from onnx import TensorProto

        self.plan_requant()
        graph_in = graph_out = None
        for node in self.gm.graph.nodes:
            if node in self.skip:
                continue
            if node.op == "placeholder":
                if graph_in is not None:
                    raise ExportError("cannot export a model with more than one input")
                graph_in = node
                self.value[node] = self.fresh(input_name)
            elif node.op == "output":
                graph_out = node.args[0]
                if not isinstance(graph_out, fx.Node):
                    raise ExportError("cannot export a model whose output is not a single tensor")
            elif node.op == "call_method" and node.target == "size":
                continue  # only feeds view/reshape, whose shape comes from shape propagation
            elif isinstance(_module(self.gm, node), QuantLayer):
                self.value[node] = self.quant_layer(node, _module(self.gm, node))
            elif node.op == "get_attr":
                raise ExportError(f"cannot export a parameter read in forward ({node.target})")
            else:
                self.value[node] = self.float_op(node)
        out = self.op("Identity", [self._input(graph_out, graph_out)], output_name)
        meta_in, meta_out = graph_in.meta["tensor_meta"], graph_out.meta["tensor_meta"]
        h = self.h
        graph = h.make_graph(
            self.nodes, "dfq_bench",
            [h.make_tensor_value_info(self.value[graph_in], TensorProto.FLOAT, ["N", *meta_in.shape[1:]])],
            [h.make_tensor_value_info(out, TensorProto.FLOAT, ["N", *meta_out.shape[1:]])],
            self.inits,
        )
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                             producer_name="dfq_bench")
        return model


def _product_scale(p: ActParams, w_scale: np.ndarray) -> np.ndarray:
    """s_x * s_w[c] in float32: the scale of a layer's int32 accumulator and of its int32 bias."""
    return (np.float32(p.scale) * w_scale).astype(np.float32)


def _int32_bias(name: str, bias: np.ndarray, scale: np.ndarray, n: int) -> np.ndarray:
    q = np.round(bias / np.broadcast_to(scale.astype(np.float64), (n,)))
    if np.abs(q).max(initial=0) >= 2**31 - 1:
        raise ExportError(f"cannot export layer {name!r}: its bias does not fit int32 at the product scale "
                          "s_x * s_w (a scale of 0?)")
    return q.astype(np.int32)


@dataclass
class Exported:
    path: Path
    n_quant_layers: int  # Conv/Linear layers with integer weights
    n_requantized: int  # of those, written to fuse into QLinearConv/QGemm with integer output
    n_conv_integer: int  # written as ConvInteger + rescale (output not requantized in the simulation)
    n_float_layers: int  # Conv/Linear computed in float (float weights or float input)
    act_levels: dict[str, str]  # quantized layer -> graph value holding its uint8 input levels


def export(model: nn.Module, example_input: torch.Tensor, path: str | Path, conv_integer: bool = True,
           requantize: bool = True) -> Exported:
    """Writes ``model`` (quantized: QuantLayers; or float) as ONNX to ``path``.

    Args:
        example_input: one batch, for tracing shapes (the batch dimension is left dynamic).
        conv_integer: write convs whose output the simulation does not requantize as ConvInteger
            (integer accumulation) instead of QDQ Conv (which ORT runs as a float conv).
        requantize: let a conv whose output goes straight into the next input quantizer fuse
            into QLinearConv (what a device does). False writes every quantized conv as
            ConvInteger + rescale: the simulation's arithmetic with integer accumulation, used to
            tell requantization error from everything else.

    Raises:
        ExportError: a choice the integer graph cannot express (one-line message naming it).
    """
    onnx = _require_onnx()
    model = model.eval()
    example_input = example_input.detach().cpu().float()
    gm = _trace(model.cpu(), example_input)
    builder = _GraphBuilder(gm, conv_integer, requantize)
    proto = builder.build()
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return Exported(path, **builder.stats, act_levels=builder.act_levels)


def read_weight_levels(path: str | Path) -> dict[str, np.ndarray]:
    """Integer weight levels per layer as stored in an exported file (``<layer>.w_q``; a
    ConvInteger layer may store ``<layer>.w_q_shifted`` = levels - zero-point, added back here)."""
    onnx = _require_onnx()
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    out = {}
    for name, arr in inits.items():
        if name.endswith(".w_q"):
            out[name[: -len(".w_q")]] = arr.astype(np.int32)
        elif name.endswith(".w_q_shifted"):
            layer = name[: -len(".w_q_shifted")]
            zp = inits[f"{layer}.w_zero_point"].astype(np.int32)
            out[layer] = arr.astype(np.int32) + zp.reshape((-1,) + (1,) * (arr.ndim - 1))
    return out
