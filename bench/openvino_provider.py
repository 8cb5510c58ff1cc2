"""The openvino target on onnxruntime's OpenVINO plugin EP (a benchmark for a machine with an
Intel CPU, GPU or NPU and `pip install onnxruntime-ep-openvino`: the plugin offers Intel devices
only, and this repository's CI machine has an AMD CPU).

    python bench/openvino_provider.py [--work DIR] [--families gemma,gemma3_sw8,gemma3n]
        [--quants fp32,int8,int4] [--multimodal int8] [--speed gemma3-270m] [--json REPORT]

The parts of bench/cuda_provider.py, for --target openvino and --provider openvino:
1. per tiny family and quant: placement (`gemma-export check`: nodes per provider of an OpenVINO
   session), the runtime on openvino against the CPU provider on the same graphs (the same ids),
   and fp32 against eager transformers with test_parity's budget;
2. --multimodal: the tiny Gemma 3n with the full-size MobileNetV5 tower, both encoders' rows on
   openvino against the CPU provider, and greedy tokens of a prompt with an image and a clip;
3. --speed VARIANT (random weights): prefill and decode tokens/s of the openvino build on the
   OpenVINO EP and on the CPU provider, and of the cpu target's build (the fastest CPU graphs:
   MatMulNBits, contrib fusions) on the CPU provider, in the same run; then the int8 build once
   more with OpenVINO's int8 activations off (DYNAMIC_QUANTIZATION_GROUP_SIZE 0: float arithmetic,
   the quality of `gemma-export eval` under onnxruntime's accuracy level 1).

Both providers quantize the activations of an int8/int4 weight MatMul to int8 on the fly by
default, in groups of 32 (onnxruntime's MatMulNBits at accuracy level 4, OpenVINO's
DYNAMIC_QUANTIZATION_GROUP_SIZE 32), so their int8/int4 logits agree closely but are not the
graph's float arithmetic (tests/test_openvino.py compares that exactly).

Measured 2026-12-02 on the lent machine (Intel Xeon, 16 cores; onnxruntime 1.30, the plugin
1.8.1 = OpenVINO 2026.4, carried there as a wheel):

  placement: every node of every graph on OpenVINOExecutionProvider (decoders of gemma /
    gemma3_sw8 / gemma3n, fp32 251 / 450 / 1093 nodes, int8 273 / 479 / 1130, int4 297 / 511 /
    1233; the multimodal export's decoder 793, vision 3074, audio 355), CPU fallback off.
  same ids, openvino vs the CPU provider, max |logit diff| (|logits| max 3.2-3.8):
               fp32      int8      int4
    gemma      6.0e-06   0.056     0.026
    gemma3_sw8 2.1e-06   0.060     0.023
    gemma3n    1.8e-05   1.4e-06   0.73 (top-1 91 %)
    fp32 vs eager: 7.6e-06 and 2.2e-06 (budgets 3.5e-04, 3.8e-04); Gemma 3n's eager reference
    does not run on that transformers (5.17). Before the runtime passed f32 through load_config
    (the plugin ignores its "precision" option), OpenVINO computed in bfloat16: fp32 vs eager 0.10.
  multimodal int8: image rows vs CPU cosine min 0.99993, audio 0.99991; greedy tokens with an
    image and a clip equal on both.
  Gemma 3 270M-shaped random weights, tokens/s (the CPU provider on all 16 cores):
                                   prefill 128  prefill 1024  decode after 128  after 1024
    openvino build int8  openvino      1571         1977           41.2            43.2
                         cpu            981         1065           96.3            97.7
    openvino build int4  openvino      1642         2124           42.9            46.0
                         cpu            945          938           89.6            88.6
    cpu build int4       cpu           1704         1521          110.6            99.0
    int8, OpenVINO's int8 activations off: openvino 1395 / 1655 prefill, 39.0 / 40.9 decode.
  So OpenVINO prefills 1.6-2.3x faster than onnxruntime's CPU kernels on the same graphs and
  decodes at 0.43-0.52x of them; the cpu target's fused MatMulNBits graphs stay the fastest
  decode on a CPU. Why OpenVINO's decode step is slow is not profiled yet (a guess: the plugin
  copies each bound input, the KV cache included, into its own tensors every run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cuda_provider as common  # noqa: E402


def float_activations() -> None:
    """OpenVINO sessions from now on compute int8-weight MatMuls in float (a property the runtime
    passes through the plugin's load_config)."""
    import gemma_runtime.providers as providers

    providers.OPENVINO_PROPERTIES["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = "0"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "openvino-provider")
    p.add_argument("--families", default="gemma,gemma3_sw8,gemma3n")
    p.add_argument("--quants", default="fp32,int8,int4")
    p.add_argument("--multimodal", default="int8", help="quant of the tiny multimodal export ('' skips it)")
    p.add_argument("--speed", default="gemma3-270m", help="variant for the speed part ('' skips it)")
    p.add_argument("--speed-quants", default="int8,int4")
    p.add_argument("--json", type=Path)
    p.add_argument("--provider", default="openvino", help="cpu: a dry run of this script where OpenVINO offers no device")
    a = p.parse_args()
    import onnxruntime as ort

    from gemma_runtime.providers import PROVIDERS, is_available

    print(f"onnxruntime {ort.__version__}", flush=True)
    ov = a.provider
    if ov == "openvino" and not is_available(PROVIDERS["openvino"]):
        from gemma_runtime import ProviderError
        from gemma_runtime.providers import resolve_provider

        try:
            resolve_provider("openvino", "openvino")
        except ProviderError as err:  # not installed, or no Intel device
            raise SystemExit(f"openvino_provider: {err}") from None
    report = {"onnxruntime": ort.__version__}
    if a.families:
        report["parity"] = common.parity(a.work, a.families.split(","), a.quants.split(","), ov, target="openvino")
    if a.multimodal:
        report["multimodal"] = common.multimodal(a.work, a.multimodal, ov, target="openvino")
    if a.speed:
        quants = a.speed_quants.split(",")
        report["speed"] = common.speed(a.work, a.speed, quants, ov, target="openvino")
        report["speed_cpu_target"] = common.speed(a.work, a.speed, ["int4"], "cpu", target="cpu")
        if "int8" in quants:
            float_activations()
            print("the openvino int8 build again, OpenVINO's int8 activations off:", flush=True)
            report["speed_float_activations"] = common.speed(a.work, a.speed, ["int8"], ov, target="openvino")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
