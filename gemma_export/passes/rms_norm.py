"""RMSNorm as one ONNX RMSNormalization node (opset 23), for NPU graphs.

model/layers.py's RMSNorm exports as five elementwise ops:

    x -> Pow(2) -> ReduceMean(axes=[-1], keepdims) -> Add(eps) -> Pow(-0.5) -> Mul(x, .) [-> Mul(., w)]

which a QDQ graph quantizes tensor by tensor: x^2 and its mean span x's range squared (the real
Gemma 3 270M's final norm sees mean(x^2) up to 1.5e6), and on Qualcomm's HTP the 16-bit Pow(-0.5)
is off by hundreds of steps, and saturates for inputs past fp16's range (bench/npu_divergence.py:
from 2 % to 43 % of the tensor's range in one decode step of the real 270M). The HTP's own RmsNorm
op (onnxruntime's QNN provider maps RMSNormalization onto it) is exact to one step over the same
inputs, and in a QDQ graph it leaves only x and the normalized output quantized.

    fuse_rms_norm(model) -> (model, count)   pure: a new ModelProto; count = norms replaced
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

RMS_NORM_OPSET = 23


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The graph's small constants (the chain's exponents, eps and axes), by name."""
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
           if i.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(i.dims)) <= 16}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _scalar(consts: dict[str, np.ndarray], name: str) -> float | None:
    v = consts.get(name)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The input of a two-input node that is not `name` (None when both or neither are)."""
    a, b = node.input
    return b if a == name else a if b == name else None


def fuse_rms_norm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Each x * (mean(x^2, -1) + eps)^-0.5 [* w] chain -> RMSNormalization(x, w or ones, axis=-1,
    epsilon=eps, stash_type=float); the opset is raised to 23. Chains whose inner tensors have other
    users stay as they are."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    consts = _constants(out)
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}

    def only_user(name: str, op: str) -> onnx.NodeProto | None:
        u = users.get(name, [])
        return u[0] if len(u) == 1 and u[0].op_type == op and name not in graph_outputs else None

    replace: dict[int, onnx.NodeProto] = {}  # id of the chain's first node -> the new node
    drop: set[int] = set()
    new_inits = []
    for square in g.node:
        if square.op_type != "Pow" or _scalar(consts, square.input[1]) != 2.0:
            continue
        x = square.input[0]
        mean = only_user(square.output[0], "ReduceMean")
        if mean is None or len(mean.input) < 2 or consts.get(mean.input[1]) is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in mean.attribute}
        if consts[mean.input[1]].reshape(-1).tolist() != [-1] or attrs.get("keepdims", 1) != 1:
            continue
        add = only_user(mean.output[0], "Add")
        eps = _scalar(consts, _other(add, mean.output[0])) if add is not None else None
        rsqrt = only_user(add.output[0], "Pow") if eps is not None else None
        if rsqrt is None or _scalar(consts, rsqrt.input[1]) != -0.5 or rsqrt.input[0] != add.output[0]:
            continue
        scale = only_user(rsqrt.output[0], "Mul")
        if scale is None or _other(scale, rsqrt.output[0]) != x:
            continue
        chain = [square, mean, add, rsqrt, scale]
        weighted = only_user(scale.output[0], "Mul")
        weight = _other(weighted, scale.output[0]) if weighted is not None else None
        init = next((i for i in g.initializer if i.name == weight), None)
        if init is not None and len(init.dims) == 1:
            chain.append(weighted)
        else:
            weight = None
        if weight is None:  # no scale (Gemma 3n's v_norm): RMSNormalization needs one, so ones
            dims = _last_dim(out, x)
            if dims is None:
                continue
            weight = f"{scale.name}.ones"
            new_inits.append(numpy_helper.from_array(np.ones(dims, np.float32), weight))
        node = helper.make_node("RMSNormalization", [x, weight], [chain[-1].output[0]], name=f"{square.name}.rms_norm",
                                axis=-1, epsilon=eps, stash_type=1)
        node.metadata_props.extend(square.metadata_props)  # the module path (name_scopes) of the norm
        replace[id(square)] = node
        drop.update(id(n) for n in chain[1:])
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    kept = [i for i in g.initializer if i.name in used or i.name not in consts]  # drop the chains' scalars
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    for op in out.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, RMS_NORM_OPSET)
    return out, len(replace)


def _last_dim(model: onnx.ModelProto, name: str) -> int | None:
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if v.name == name and v.type.tensor_type.shape.dim:
            d = v.type.tensor_type.shape.dim[-1]
            return d.dim_value if d.HasField("dim_value") else None
    return None
