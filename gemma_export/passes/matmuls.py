"""Passes over the MatMuls with constant weights: MatMulNBits (4/8 bits) and float16 storage.

Which MatMul is which comes from the exporter: torch.onnx records each node's module path in its
metadata (`pkg.torch.onnx.name_scopes`, e.g. [..., 'decoder.layers.0.self_attn.q_proj', 'linear'])
and the LM head is our parameter `lm_head_t`. After onnxscript's optimizer every nn.Linear is a
MatMul whose second input is an initializer [K, N] (the transpose is folded into the weight).

    x [.., K] ──MatMul(W [K, N])──> y          x ──MatMulNBits(B, scales[, zero_points])──> y
                                        ==>
                                               x ──MatMul(Cast(W16 -> float32))──> y   (fp16)
                                               x ──MatMul(DequantizeLinear(Wq [K, N], s [K/B, N]))──> y
                                                                    (qdq storage: blocked, opset 21)

Affine 4-bit blocks (value = s q + o, a float offset per block) go as a symmetric MatMulNBits plus
the offsets' share, because onnxruntime's CPU kernel has no fast path for float zero points (it
dequantizes the whole weight every run: 0.8 vs 25 decode tokens/s on Gemma 3 270M,
bench/int4_kernels.py):

    x ──MatMulNBits(B, scales)───────────────────────────────┐  (implicit zero point 8)
    x ──MatMul(S [K, n_blocks]: 1 where row k is in block b)──> xs ──MatMul(O [n_blocks, N])──> Add ──> y

    sum_b s_b x_b.(q_b - zp_b) = sum_b s_b x_b.(q_b - 8) + sum_b (sum x_b) s_b (8 - zp_b),  O = s (8 - zp)

xs (the block sums of x) is computed once per input tensor and shared by the projections that read it.
O stays float32. Tried 2026-12-02 and not kept: O as an 8-bit MatMulNBits (blocks of 32 along
n_blocks, the weight's accuracy level). It cut E2B's runtime peak RSS by 0.12 GiB (O is mapped from
the data file and prepacked again), and moved 270M decode by +1.5% and prefill by -2 to -4%. But
Gemma 3 270M int4 fell from 90.92% / 0.0308 / 1.0246 to 90.67% / 0.0317 / 1.0272 (2048 tokens,
top-1 / KL / ppl ratio), close to tests/test_quant_real.py's floor.

A weight whose packed B reaches SPLIT_FROM_BYTES (a large LM head) is cut along N into column parts, each
its own MatMulNBits (plus offsets), their outputs joined by a Concat on the last axis: onnxruntime
prepacks one weight at a time, so its start-up peak then carries a part twice, not the whole head.

Weights that read one input in one format (q/k/v, gate/up) are quantized each alone and written as
one MatMulNBits of all their columns, its output Split into theirs (sibling_groups). Gemma 3 270M
int4 --lm-head 4: 548 -> 494 decoder nodes; decode after a 128-token prompt 1.15x and 1.03x in two
sessions of bench/compare_exports.py (2 threads, median of 5 interleaved runs; after 1024 tokens
1.00x and 1.03x), the same greedy tokens. E2B-shaped int4: 2330 -> 2228 nodes, decode 0.98x (its
step is ~100 ms of weight reads, not node overhead).
"""

from __future__ import annotations

import ast
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..recipes import Recipe
from . import blockwise
from .rescore import rescore_nodes
from .store import TensorStore

MS_DOMAIN = "com.microsoft"
_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class WeightMatMul:
    """A constant weight and the MatMul nodes that take it as their second input."""

    weight: str  # initializer name
    module: str  # exporter module path ('decoder.layers.0.mlp.up_proj'), or the weight's name
    tensor_class: str  # attention | mlp | lm_head | other
    nodes: tuple[int, ...]  # indices in graph.node
    shape: tuple[int, int]  # [K, N]


@dataclass(frozen=True)
class TensorReport:
    module: str
    tensor_class: str
    shape: tuple[int, int]
    format: str  # "int4/b32/sym", "fp16", ...
    rel_error: float  # ||W - W'|| / ||W||


def _module_path(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None
    return None


def _classify(weight: str, module: str | None) -> str:
    if weight.split(".")[-1] == "lm_head_t":
        return "lm_head"
    parts = (module or "").split(".")
    if "self_attn" in parts:
        return "attention"
    if "mlp" in parts:
        return "mlp"
    return "other"


def weight_matmuls(model: onnx.ModelProto) -> list[WeightMatMul]:
    """MatMuls whose second input is a 2-D float initializer used by nothing but MatMuls' B."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, list[tuple[int, int]]] = {}
    for i, node in enumerate(graph.node):
        for slot, name in enumerate(node.input):
            if name in inits:
                uses.setdefault(name, []).append((i, slot))
    graph_outputs = {o.name for o in graph.output}
    found = []
    for name, places in uses.items():
        t = inits[name]
        if len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT or name in graph_outputs:
            continue
        if not all(graph.node[i].op_type == "MatMul" and slot == 1 for i, slot in places):
            continue
        nodes = tuple(i for i, _ in places)
        module = _module_path(graph.node[nodes[0]])
        cls = _classify(name, module)
        found.append(WeightMatMul(name, module if module and cls != "lm_head" else name, cls, nodes, (t.dims[0], t.dims[1])))
    return found


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _ensure_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _format_name(fmt) -> str:
    if fmt.bits == 16:
        return "fp16"
    kind = "sym" if fmt.symmetric else "affine" if fmt.affine else "asym"
    kernel = "qdq" if fmt.storage == "qdq" else f"acc{fmt.accuracy_level}"
    return f"int{fmt.bits}/b{fmt.block_size}/{kind}{'' if fmt.scale_search else '/rtn'}/{kernel}"


def quantize_matmuls(model: onnx.ModelProto, recipe: Recipe, store: TensorStore,
                     report: list[TensorReport] | None = None, progress=None,
                     importance: dict[str, np.ndarray] | None = None, fuse_siblings: bool = True) -> onnx.ModelProto:
    """A new model in which every weight MatMul whose class the recipe quantizes is a MatMulNBits
    (bits 4/8) or a MatMul of a float16 weight cast to float32 (bits 16). `model` is not changed;
    weights are read and written one at a time through `store`. `importance`: weight initializer
    name -> mean x^2 per input channel (passes/calibrate.py), weighting the block search.
    `fuse_siblings`: integer weights that read one input in one format become one node
    (sibling_groups)."""
    out = _copy(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    replaced: dict[str, list[onnx.TensorProto]] = {}  # old weight -> new initializers
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # node index -> its replacement nodes
    block_sums = _BlockSums(store)
    groups = weight_matmuls(out)
    # names of the new tensors and nodes come from the module path; two weights of one module (the
    # exporter can write one parameter as two initializers, e.g. Gemma 3n's AltUp modality router
    # used by predict and correct) also carry their own initializer's name
    per_module = Counter(wm.module for wm in groups)
    stems = {wm.weight: wm.module if per_module[wm.module] == 1 else f"{wm.module}.{wm.weight}" for wm in groups}
    siblings = sibling_groups(groups, graph, recipe) if fuse_siblings else {}
    for wm in groups:
        fmt = recipe.format_for(wm.tensor_class, wm.module)
        if fmt is None:
            continue
        members = siblings.get(wm.weight)
        if members is not None and members[0] is not wm:
            continue  # quantized and written with the group's first member
        stem = stems[wm.weight] if members is None else _fused_stem([stems[m.weight] for m in members])
        w = store.read(inits[wm.weight]) if members is None else None
        if fmt.bits == 16:
            tensors, err, weight_node = _float16_weight(w, stem, store, wm.module)
            replaced[wm.weight] = tensors
            for n, i in enumerate(wm.nodes):
                node = onnx.NodeProto()
                node.CopyFrom(graph.node[i])
                node.input[1] = weight_node.output[0]
                new_nodes[i] = ([weight_node] if n == 0 else []) + [node]
            # the weight's node must come before every consumer: before the first one (nodes are sorted)
        else:
            qdq = fmt.storage == "qdq"
            k = wm.shape[0]
            block = qdq_block(k, fmt.block_size) if qdq else fmt.block_size
            if members is None:
                codes = _quantized(wm, w, fmt, block, importance)
                err = codes.rel_error
            else:  # each member alone (the same codes as unfused), then one weight of all columns
                parts_codes = []
                for m in members:
                    w = store.read(inits[m.weight])
                    parts_codes.append(_quantized(m, w, fmt, block, importance))
                    if report is not None:
                        report.append(TensorReport(m.module, m.tensor_class, m.shape, _format_name(fmt), parts_codes[-1].rel_error))
                    del w
                codes = _concat_codes(parts_codes)
                del parts_codes
                w, err = None, None
            n = codes.codes.shape[0]
            offsets = _block_offsets(codes) if fmt.affine else None  # symmetric codes (zero point 8) + O [n_blocks, N]
            if qdq:
                b = None
            else:
                b, scales, zp = blockwise.pack(codes)
                if fmt.affine:
                    zp = None
            parts = _column_parts(n, (codes.codes.size * fmt.bits) // 8)
            names = [stem] if len(parts) == 1 else [f"{stem}.part{p}" for p in range(len(parts))]
            written = []  # per part: (MatMulNBits or DequantizeLinear inputs, offsets tensor or None)
            for name, (a, e) in zip(names, parts):
                if qdq:
                    tensors = _qdq_tensors(codes, a, e, name, store)
                else:
                    tensors = [store.write(f"{name}.weight_Q{fmt.bits}", b[a:e]),
                               store.write(f"{name}.scales", scales.reshape(n, -1)[a:e].reshape(-1))]
                    if zp is not None:
                        tensors.append(store.write(f"{name}.zero_points", zp.reshape(n, -1)[a:e].reshape(-1)))
                part_offsets = None if offsets is None else store.write(f"{name}.block_offsets", np.ascontiguousarray(offsets[:, a:e]))
                written.append((tensors, part_offsets))
            del b, codes, offsets
            replaced[wm.weight] = [t for tensors, o in written for t in tensors + ([o] if o is not None else [])]
            rescore = recipe.lm_head_rescore if wm.tensor_class == "lm_head" else 0
            # the int8 rows are made and written once per weight, whatever number of nodes reads it
            rescoring = rescore_nodes(w, rescore, stem, store, recipe.lm_head_rows) if rescore else None
            if rescoring is not None:
                replaced[wm.weight] += rescoring.tensors
                graph.input.extend(i for i in rescoring.inputs if i.name not in {g.name for g in graph.input})
            if members is not None:
                for m in members[1:]:
                    replaced[m.weight] = []
                    new_nodes[m.nodes[0]] = []  # the fused node, at the first member's place, makes its output
            for reader, i in enumerate(wm.nodes):
                old = graph.node[i]
                new_nodes[i] = []
                if members is not None:  # one node of all the members' columns, then a Split into their outputs
                    fused = onnx.NodeProto()
                    fused.CopyFrom(old)
                    fused.output[0] = f"/{stem}/fused_output"
                    old = fused
                outs = []
                # node names must be unique: a weight read by two MatMuls (Gemma 3n's AltUp router,
                # used by predict and correct) gets one set of nodes per reader
                tag = "" if reader == 0 else f"/reader{reader}"
                # with rescoring, the quantized head makes the approximate logits (passes/rescore.py)
                head_out = f"{old.output[0]}/approx" if rescoring is not None else old.output[0]
                for p, (name, (a, e), (tensors, part_offsets)) in enumerate(zip(names, parts, written)):
                    out_p = head_out if len(parts) == 1 else f"{old.output[0]}/part{p}"
                    outs.append(out_p)
                    y = out_p if part_offsets is None else f"{out_p}/symmetric"
                    if qdq:  # the weight's DequantizeLinear once, before its first reader
                        dq_out = f"{name}.weight_dequantized"
                        if reader == 0:
                            new_nodes[i].append(helper.make_node(
                                "DequantizeLinear", [t.name for t in tensors], [dq_out], name=f"/{name}/DequantizeLinear",
                                axis=0, block_size=block))
                        node = helper.make_node("MatMul", [old.input[0], dq_out], [y], name=f"/{name}{tag}/MatMul")
                    else:
                        attrs = dict(K=k, N=e - a, bits=fmt.bits, block_size=fmt.block_size)
                        if fmt.accuracy_level:
                            attrs["accuracy_level"] = fmt.accuracy_level
                        node = helper.make_node("MatMulNBits", [old.input[0]] + [t.name for t in tensors], [y],
                                                name=f"/{name}{tag}/MatMulNBits", domain=MS_DOMAIN, **attrs)
                    node.metadata_props.extend(old.metadata_props)
                    new_nodes[i].append(node)
                    if part_offsets is not None:
                        xs = block_sums.of(old.input[0], k, block)
                        share = f"{out_p}/offsets"
                        new_nodes[i] += [
                            helper.make_node("MatMul", [xs, part_offsets.name], [share], name=f"/{name}{tag}/offsets/MatMul"),
                            helper.make_node("Add", [y, share], [out_p], name=f"/{name}{tag}/offsets/Add"),
                        ]
                if len(parts) > 1:
                    new_nodes[i].append(helper.make_node("Concat", outs, [head_out], name=f"/{stem}{tag}/Concat", axis=-1))
                if rescoring is not None:
                    new_nodes[i] += rescoring.nodes(old.input[0], head_out, old.output[0])
                if members is not None:
                    split, sizes = _split_node(stem, old.output[0], [graph.node[m.nodes[0]].output[0] for m in members],
                                               [m.shape[1] for m in members])
                    new_nodes[i].append(split)
                    replaced[wm.weight].append(sizes)
        del w
        if report is not None and err is not None:
            report.append(TensorReport(wm.module, wm.tensor_class, wm.shape, _format_name(fmt), err))
        if progress is not None:
            for m in members or (wm,):
                progress(m.module)
    if not replaced:
        return out
    nodes = []
    for i, node in enumerate(graph.node):
        for new in new_nodes.get(i, [node]):
            nodes.extend(block_sums.due(new))  # a block sum right before its first reader
            nodes.append(new)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for tensors in replaced.values():
        graph.initializer.extend(tensors)
    graph.initializer.extend(block_sums.initializers())
    if any(n.domain == MS_DOMAIN for n in graph.node):
        _ensure_ms_opset(out)
    if any(n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute) for n in graph.node):
        _ensure_opset(out, QDQ_OPSET)
    return out


def sibling_groups(groups: list[WeightMatMul], graph: onnx.GraphProto, recipe: Recipe) -> dict[str, tuple[WeightMatMul, ...]]:
    """Weights to fuse: two or more that are each read by one MatMul, all of the same input and K,
    quantized to the same MatMulNBits format (q/k/v of an attention, gate/up of an MLP), keyed by
    each member's weight name. One MatMulNBits of all their columns and a Split cost fewer nodes
    and thread-pool rounds than one node each (as onnxruntime-genai's builder fuses qkv_proj).
    The LM head (rescored, cut into parts) and float16 or QDQ weights stay as they are."""
    by_input: dict[tuple, list[WeightMatMul]] = {}
    for wm in groups:
        fmt = recipe.format_for(wm.tensor_class, wm.module)
        if (fmt is None or fmt.bits not in (4, 8) or fmt.storage != "matmulnbits" or wm.tensor_class == "lm_head"
                or len(wm.nodes) != 1):
            continue
        by_input.setdefault((graph.node[wm.nodes[0]].input[0], wm.shape[0], fmt), []).append(wm)
    out = {}
    for members in by_input.values():
        if len(members) > 1:
            members = tuple(sorted(members, key=lambda m: m.nodes[0]))
            out.update({m.weight: members for m in members})
    return out


def _fused_stem(stems: list[str]) -> str:
    """'a.b.q_proj', 'a.b.k_proj' -> 'a.b.q_proj+k_proj': the members' common prefix, then their own parts."""
    split = [s.split(".") for s in stems]
    common = 0
    while all(len(p) > common + 1 and p[common] == split[0][common] for p in split):
        common += 1
    return ".".join(split[0][:common] + ["+".join(".".join(p[common:]) for p in split)])


def _quantized(wm: WeightMatMul, w: np.ndarray, fmt, block: int, importance: dict[str, np.ndarray] | None) -> blockwise.BlockCodes:
    imp = None if importance is None else importance.get(wm.weight)
    if importance is not None and imp is None:
        raise ValueError(f"{wm.module}: no calibration statistics for weight {wm.weight}")
    return blockwise.quantize(w, fmt.bits, block, fmt.symmetric, fmt.scale_search, fmt.affine, imp)


def _concat_codes(parts: list[blockwise.BlockCodes]) -> blockwise.BlockCodes:
    """The block codes of the weights [K, N_i] as those of one [K, sum N_i] (blocks run along K,
    so each column's codes are its own)."""
    first = parts[0]
    return blockwise.BlockCodes(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                                np.concatenate([p.zero_points for p in parts]), first.bits, first.symmetric, first.k)


def _split_node(stem: str, fused: str, outputs: list[str], widths: list[int]) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    """The Split of a fused node's output into its members' outputs, and its sizes tensor."""
    sizes = numpy_helper.from_array(np.array(widths, dtype=np.int64), f"{stem}.split_sizes")
    return helper.make_node("Split", [fused, sizes.name], outputs, name=f"/{stem}/Split", axis=-1), sizes


def _float16_weight(w: np.ndarray, stem: str, store: TensorStore, module: str):
    """([W16], relative error, the Cast to float32 that MatMul reads)."""
    w16 = w.astype(np.float16)
    if not np.isfinite(w16).all():
        raise ValueError(f"{module}: weights overflow float16")
    err = float(np.linalg.norm(w - w16.astype(np.float32)) / max(np.linalg.norm(w), 1e-30))
    t16 = store.write(f"{stem}.weight_fp16", w16)
    cast = helper.make_node("Cast", [t16.name], [f"{stem}.weight_fp16_to_fp32"], name=f"/{stem}/Cast", to=onnx.TensorProto.FLOAT)
    return [t16], err, cast


def _qdq_tensors(codes: blockwise.BlockCodes, a: int, e: int, name: str, store: TensorStore) -> list[onnx.TensorProto]:
    """Output columns [a, e) of a weight's block codes as opset 21's blocked DequantizeLinear takes
    them (axis 0): codes [K, e - a], scales [n_blocks, e - a](, zero points likewise). Symmetric
    and affine codes (zero point 2^(bits-1): affine's offsets go beside, as for MatMulNBits) are
    shifted to signed int8/int4 without zero points; asymmetric ones stay unsigned with theirs."""
    q = codes.codes[a:e].reshape(e - a, -1)[:, :codes.k].T  # [K, cols], the last block's padding dropped
    signed = codes.symmetric or codes.zero_points.dtype == np.float32
    bits = codes.bits
    shift = 2 ** (bits - 1) if signed else 0
    tensors = [_int_tensor(store, f"{name}.weight_q{bits}", q.astype(np.int16) - shift, bits, signed),
               store.write(f"{name}.weight_scales", np.ascontiguousarray(codes.scales[a:e].T))]
    if not signed:
        tensors.append(_int_tensor(store, f"{name}.weight_zero_points", codes.zero_points[a:e].T, bits, False))
    return tensors


def qdq_block(k: int, block: int) -> int:
    """The block of a QDQ weight with K rows: `block` when it divides K, else the largest power of
    two below it that does (K itself when K < block, e.g. Gemma 3n's AltUp coefficients, K = 4).
    OpenVINO's ONNX frontend refuses a blocked DequantizeLinear whose axis is not a whole number
    of blocks; MatMulNBits pads the last block instead (for K < block the same codes: the padding
    repeats the last row, which leaves the block's range as it is)."""
    if k % block == 0:
        return block
    if k < block:
        return k
    while k % block:
        block //= 2
    return block


def _int_tensor(store: TensorStore, name: str, values: np.ndarray, bits: int, signed: bool) -> onnx.TensorProto:
    """An int8/uint8 tensor, or an INT4/UINT4 one packed two a byte (ONNX's order: row-major,
    the even element in the low nibble)."""
    if bits == 8:
        return store.write(name, np.ascontiguousarray(values.astype(np.int8 if signed else np.uint8)))
    flat = (values.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    kind = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    return store.write(name, flat[0::2] | (flat[1::2] << 4), packed=(kind, tuple(values.shape)))


# blocked DequantizeLinear (axis 0, block_size) and 4-bit types came in opset 21
QDQ_OPSET = 21


def _ensure_opset(model: onnx.ModelProto, version: int) -> None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < version:
            o.version = version


# Weights of at least SPLIT_FROM_BYTES packed are cut into parts of at most MAX_PART_BYTES.
# onnxruntime prepacks each weight at session start while its original is still mapped, so the
# start-up peak carries one weight twice: on E2B the int8 LM head (512 MiB) took the runtime's peak
# RSS from 2.78 to 3.28 GiB (in 8 parts: 2.84 GiB). Smaller weights stay whole: cut in 3, the
# Gemma 3 270M LM head (160 MiB) decoded 5-10% slower (41-47 vs 47-52 ms a step, interleaved runs).
SPLIT_FROM_BYTES = 256 << 20
MAX_PART_BYTES = 128 << 20


def _column_parts(n: int, nbytes: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of output columns: one, or parts of at most MAX_PART_BYTES of B each."""
    count = 1 if nbytes < SPLIT_FROM_BYTES else -(-nbytes // MAX_PART_BYTES)
    step = -(-n // count)
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _block_offsets(codes: blockwise.BlockCodes) -> np.ndarray:
    """O [n_blocks, N] float32 = s (8 - zp) of affine 4-bit blocks: what a symmetric MatMulNBits
    of the same codes leaves out, per unit of the block's input sum."""
    return np.ascontiguousarray((codes.scales * (8.0 - codes.zero_points)).T.astype(np.float32))


# A block-sum 0/1 matrix up to this size stays a MatMul: it stays in the CPU's caches, and one node
# costs less per step than two (Gemma 3 270M: K 640 and 2048, 50 KB and 512 KB)
SUMS_MATRIX_MAX_BYTES = 1 << 20


class _BlockSums:
    """xs [1, T, n_blocks]: the sums of x [1, T, K] over each block of K, one computation per input
    tensor: a MatMul with a 0/1 [K, n_blocks] constant (one per (K, block size)), or, where that
    constant is larger than SUMS_MATRIX_MAX_BYTES and K a multiple of the block, Reshape to
    [1, T, n_blocks, block] + ReduceSum, which reads only x: the MatMul read its constant every
    step, 8 MiB for K = 8192, a tenth of what an E2B-shaped int4 decode step read."""

    def __init__(self, store: TensorStore):
        self.store = store
        self.matrices: dict[tuple[int, int], onnx.TensorProto] = {}
        self.shapes: dict[tuple[int, int], onnx.TensorProto] = {}  # Reshape targets and ReduceSum axes
        self._nodes: dict[str, list[onnx.NodeProto]] = {}  # xs name -> its nodes, until placed
        self._names: dict[tuple[str, int], str] = {}

    def of(self, x: str, k: int, block: int) -> str:
        if (x, block) not in self._names:
            xs = f"{x}/block_sums_b{block}"
            stem = f"/{x.strip('/')}/block_sums_b{block}"
            self._names[(x, block)] = xs
            if k % block == 0 and k * (k // block) * 4 > SUMS_MATRIX_MAX_BYTES:
                shape, axes = self._constant(f"block_sums.shape.K{k}.b{block}", [0, 0, k // block, block]), \
                    self._constant("block_sums.axes", [-1])
                self._nodes[xs] = [
                    helper.make_node("Reshape", [x, shape.name], [f"{xs}/blocks"], name=f"{stem}/Reshape"),
                    helper.make_node("ReduceSum", [f"{xs}/blocks", axes.name], [xs], name=f"{stem}/ReduceSum", keepdims=0),
                ]
            else:
                if (k, block) not in self.matrices:
                    s = np.zeros((k, -(-k // block)), dtype=np.float32)
                    s[np.arange(k), np.arange(k) // block] = 1.0
                    self.matrices[(k, block)] = self.store.write(f"block_sums.K{k}.b{block}", s)
                self._nodes[xs] = [helper.make_node("MatMul", [x, self.matrices[(k, block)].name], [xs],
                                                    name=f"{stem}/MatMul")]
        return self._names[(x, block)]

    def _constant(self, name: str, values: list[int]) -> onnx.TensorProto:
        if name not in self.shapes:
            self.shapes[name] = numpy_helper.from_array(np.array(values, dtype=np.int64), name)
        return self.shapes[name]

    def initializers(self) -> list[onnx.TensorProto]:
        return [*self.matrices.values(), *self.shapes.values()]

    def due(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """The block-sum nodes `node` reads that are not placed yet (then placed)."""
        return [n for i in node.input if i in self._nodes for n in self._nodes.pop(i)]


def relocate_initializers(model: onnx.ModelProto, source: TensorStore, target: TensorStore) -> onnx.ModelProto:
    """A new model whose initializers that still live in `source` are copied into `target`."""
    out = _copy(model)
    moved = []
    for t in out.graph.initializer:
        if t.name in target.written:
            moved.append(t)
        elif t.data_location == onnx.TensorProto.EXTERNAL:
            moved.append(target.write(t.name, source.read(t)))
        else:
            moved.append(target.copy(t))
    del out.graph.initializer[:]
    out.graph.initializer.extend(moved)
    return out
