"""Where do the emulated HTP and the CPU provider part ways on the same QDQ graph? Per tensor.

    .venv/bin/python bench/npu_divergence.py NPU_OUT [--graph decode] [--prompt-tokens 64]
        [--float FLOAT_DIR] [--work DIR] [--show 40] [--json REPORT]

Feeds: a prompt of real text (CPython's docs, as bench/npu_quality.py) prefilled with the QDQ prefill
graph on the CPU provider, then the feeds of the first decode step (--graph decode) or of the next
prefill chunk (--graph prefill). The same feeds go to both providers, so the KV cache does not carry
one provider's error into the other's run.

Probe: every QuantizeLinear output of the QDQ graph (each quantized activation, uint16) becomes a
graph output, so both providers return the integer codes of every activation and they compare step
by step (a difference of k means k quantization steps of that tensor). With --float (the float
prefill/decode graphs an export keeps with write_npu_export(keep_float=...)), the float value of the
same tensor (the QuantizeLinear's input) is the third column: how far each run is from exact.

--local cuts every edge between quantized ops (cut_model): each DequantizeLinear reads the CPU run's
codes, so a tensor's difference is its own op's error on the HTP, not an inherited one.

Prints, in graph order, every tensor whose HTP/CPU codes differ by more than --steps (default 16)
steps, up to --show of them, and the worst tensor per decoder layer; --json writes all rows.

Measured (2026-12-01, real Gemma 3 270M qnn-htp export, first decode step after 64 tokens; "rel" is
the largest difference over the tensor's largest |value|; commands: an export kept with its float
graphs, `npu_divergence.py OUT --float FLOAT [--local] [--cpu-int8-matmul]`):

  op (--local, own error)          2026-11-24 export         after
  Pow(-0.5), the RMSNorm rsqrt     up to 43 % (final norm:   gone: RMSNormalization, <= 1 step
                                   mean(x^2) = 1.5e6 is past
                                   fp16; HTP saturates), 2-3 %
                                   in the q/k norms
  MatMul, int8 weights             1-2.5 %: the CPU's side   <= 0.16 % (cpu_reference_options)
                                   (MatMulNBits int8 input)
  MatMul last @ hidden             6 % (the HTP rounds the   gone: Mul + ReduceSum
                                   residual stream to 8 bit)
  MatMul of two activations        up to 6 % (median 1 %)    the same (not fixed)
  (attention q.K^T, p.V)

  decode-step logits, max |HTP - CPU|: 13.1 (top-1 differs) -> 6.6 (RMSNormalization, CPU int8
  MatMul) -> 4.9 (CPU as the graph says) -> 1.1 (last row by Mul + ReduceSum); prefill (64 rows,
  the last one's logits): 3.7, same top-1.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from gemma_export.passes.qdq import cpu_reference_options
from gemma_runtime.manifest import read_manifest
from gemma_runtime.session_cache import _create


def _options(provider: str = "CPUExecutionProvider") -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    if provider == "CPUExecutionProvider" and not CPU_INT8_MATMUL:
        cpu_reference_options(o)
    return o


CPU_INT8_MATMUL = False  # --cpu-int8-matmul: onnxruntime's default MatMulNBits accuracy level (int8 activations)


def quantized_activations(model: onnx.ModelProto) -> list[dict]:
    """One row per QuantizeLinear of an activation, in graph order: its float input, its code
    output, scale and zero point, and the op that made the float input."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    rows = []
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits:
            continue
        scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        zp = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 else np.zeros((), np.uint8)
        src = producer.get(n.input[0])
        rows.append({"tensor": n.input[0], "code": n.output[0], "op": src.op_type if src else "input",
                     "node": src.name if src else n.input[0], "scope": _scope(src) if src else "",
                     "scale": float(scale.max()), "zero_point": int(zp.max()),
                     "dtype": zp.dtype.name})
    return rows


def _scope(node: onnx.NodeProto) -> str:
    """The torch module path of a node (torch.onnx's name_scopes), e.g. decoder.layers.3.mlp."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in json.loads(p.value.replace("'", '"')) if s]
            return "/".join(scopes[-2:]) if scopes else ""
    return ""


def probe_model(src: Path, dst: Path, names: list[str], dtypes: dict[str, int]) -> None:
    """`src` with `names` added as graph outputs (weights as external data beside `dst`)."""
    model = onnx.load(str(src))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(helper.make_tensor_value_info(name, dtypes[name], None))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data", size_threshold=1024)


def cut_model(src: Path, dst: Path, codes: dict[str, np.ndarray]) -> None:
    """The probe model with every edge between quantized ops cut: each DequantizeLinear of an
    activation reads a graph input `<code>.cpu` (fed with the CPU run's codes) instead of the code
    its producer made in this run, so each op's output shows only that op's own error."""
    model = onnx.load(str(src))
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in codes:
            n.input[0] = n.input[0] + ".cpu"
    for name, value in codes.items():
        elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        model.graph.input.append(helper.make_tensor_value_info(name + ".cpu", elem, value.shape))
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data", size_threshold=1024)


def recorded_feeds(folder: Path, graph: str, prompt_tokens: int) -> dict[str, np.ndarray]:
    """The feeds of `graph` after prefilling `prompt_tokens` of real text on the CPU provider."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from npu_quality import _driver, _variant

    from gemma_export.evaluate import cpython_docs_text, encode_text

    variant = _variant(folder, None)
    chunk = read_manifest(folder).prefill_chunk
    ids = encode_text(folder, cpython_docs_text())[: prompt_tokens + chunk]
    sessions = {g: _create(folder / f"{g}.onnx", _options(), "CPUExecutionProvider") for g in ("prefill", "decode")}
    driver = _driver(folder, variant)
    driver.teacher_forced(lambda g, f: sessions[g].run(None, f), ids[:prompt_tokens], [])
    nxt = ids[prompt_tokens:prompt_tokens + (1 if graph == "decode" else chunk)]
    return driver.feeds(nxt, prompt_tokens, 1 if graph == "decode" else chunk)


def run(path: Path, provider: str, feeds, outputs: list[str]) -> tuple[dict[str, np.ndarray], float, float]:
    start = time.perf_counter()
    session = _create(path, _options(provider), provider)
    made = time.perf_counter()
    values = session.run(outputs, feeds)
    return dict(zip(outputs, values)), made - start, time.perf_counter() - made


def compare(rows: list[dict], cpu: dict, htp: dict, exact: dict | None) -> list[dict]:
    out = []
    for r in rows:
        c, h = cpu[r["code"]].astype(np.int64), htp[r["code"]].astype(np.int64)
        d = np.abs(c - h)
        fc, fh = (c - r["zero_point"]) * r["scale"], (h - r["zero_point"]) * r["scale"]
        span = max(float(np.abs(fc).max()), 1e-30)
        row = {**r, "max_steps": int(d.max()), "mean_steps": float(d.mean()), "max_abs": float(np.abs(fc - fh).max()),
               "cpu_absmax": span, "rel": float(np.abs(fc - fh).max() / span),
               "cpu_saturated": float(((c == 0) | (c == np.iinfo(r["dtype"]).max)).mean()),
               "htp_saturated": float(((h == 0) | (h == np.iinfo(r["dtype"]).max)).mean())}
        if exact is not None and r["tensor"] in exact:
            x = exact[r["tensor"]].astype(np.float64)
            row["cpu_vs_float"] = float(np.abs(fc - x).max() / max(float(np.abs(x).max()), 1e-30))
            row["htp_vs_float"] = float(np.abs(fh - x).max() / max(float(np.abs(x).max()), 1e-30))
        out.append(row)
    return out


def _layer(name: str) -> int | None:
    m = re.search(r"layers\.(\d+)", name)
    return int(m.group(1)) if m else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("npu", type=Path)
    p.add_argument("--graph", choices=("decode", "prefill"), default="decode")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--float", type=Path, help="folder of the float prefill/decode graphs (write_npu_export keep_float)")
    p.add_argument("--work", type=Path, default=Path("/tmp/npu-divergence"))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--show", type=int, default=40)
    p.add_argument("--json", type=Path)
    p.add_argument("--local", action="store_true",
                   help="cut every edge (cut_model): each op's own HTP error on the CPU run's input codes")
    p.add_argument("--cpu-int8-matmul", action="store_true",
                   help="the CPU at onnxruntime's default MatMulNBits accuracy (int8 inputs), not as the graph says")
    args = p.parse_args()
    global CPU_INT8_MATMUL
    CPU_INT8_MATMUL = args.cpu_int8_matmul

    src = args.npu / f"{args.graph}.onnx"
    rows = quantized_activations(onnx.load(str(src), load_external_data=False))
    codes = [r["code"] for r in rows]
    dtype_of = {"uint16": onnx.TensorProto.UINT16, "uint8": onnx.TensorProto.UINT8, "int16": onnx.TensorProto.INT16,
                "int8": onnx.TensorProto.INT8}
    probe = args.work / f"{args.graph}.probe.onnx"
    probe_model(src, probe, codes, {r["code"]: dtype_of[r["dtype"]] for r in rows})
    feeds = recorded_feeds(args.npu, args.graph, args.prompt_tokens)
    np.savez(args.work / f"{args.graph}.feeds.npz", **feeds)
    names = ["logits"] + codes
    cpu, cpu_make, cpu_run = run(probe, "CPUExecutionProvider", feeds, names)
    if args.local:
        cut = args.work / f"{args.graph}.cut.onnx"
        cut_model(probe, cut, {c: cpu[c] for c in codes})
        probe = cut
    htp_feeds = {**feeds, **{c + ".cpu": cpu[c] for c in codes}} if args.local else feeds
    htp, htp_make, htp_run = run(probe, "QNNExecutionProvider", htp_feeds, names)
    np.savez(args.work / f"{args.graph}.codes.npz", **{f"cpu/{k}": v for k, v in cpu.items()},
             **{f"htp/{k}": v for k, v in htp.items()})
    exact = None
    if args.float is not None:
        fprobe = args.work / f"{args.graph}.float-probe.onnx"
        # the quantizer renames a graph output X's float source to X_QuantizeLinear_Input
        float_name = {r["tensor"]: r["tensor"].removesuffix("_QuantizeLinear_Input") for r in rows}
        tensors = sorted(set(float_name.values()))
        probe_model(args.float / f"{args.graph}.onnx", fprobe, tensors, {t: onnx.TensorProto.FLOAT for t in tensors})
        got, _, _ = run(fprobe, "CPUExecutionProvider", feeds, ["logits"] + tensors)
        exact = {"logits": got["logits"], **{t: got[f] for t, f in float_name.items()}}
    table = compare(rows, cpu, htp, exact)
    logits = {"max_abs_diff": float(np.abs(cpu["logits"] - htp["logits"]).max()),
              "cpu_top1": int(cpu["logits"].argmax()), "htp_top1": int(htp["logits"].argmax())}
    if exact is not None:
        logits["float_top1"] = int(exact["logits"].argmax())
        logits["cpu_vs_float_max_abs"] = float(np.abs(cpu["logits"] - exact["logits"]).max())
    print(json.dumps({"graph": args.graph, "logits": logits, "seconds": {
        "cpu_session": round(cpu_make, 1), "cpu_run": round(cpu_run, 2),
        "htp_session": round(htp_make, 1), "htp_run": round(htp_run, 2)}}, indent=2))

    cols = ("max_steps", "mean_steps", "rel", "cpu_absmax", "cpu_vs_float", "htp_vs_float", "htp_saturated")
    print(f"\nfirst tensors whose codes differ by more than {args.steps} steps:")
    print("  ".join(["tensor", "op", "scale"] + list(cols)))
    shown = 0
    for r in table:
        if r["max_steps"] > args.steps and shown < args.show:
            shown += 1
            print(f"{r['tensor']} [{r['scope']}]  {r['op']}  {r['scale']:.3g}  " + "  ".join(
                f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))
    print("\nper layer (largest relative HTP/CPU difference of any tensor in the layer; worst tensor):")
    worst: dict = {}
    for r in table:
        k = _layer(r["scope"])
        if k not in worst or r["rel"] > worst[k]["rel"]:
            worst[k] = r
    for k in sorted(worst, key=lambda x: (x is None, x if x is not None else 0)):
        r = worst[k]
        print(f"layer {k}: rel {r['rel']:.4g} ({r['max_steps']} steps) at {r['tensor']} [{r['scope']}] ({r['op']})")
    if args.json:
        args.json.write_text(json.dumps({"logits": logits, "tensors": table}, indent=1))


if __name__ == "__main__":
    main()
