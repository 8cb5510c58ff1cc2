"""QDQ quantization for NPU targets: weights int8 per output channel (symmetric), activations
uint8/uint16 with ranges calibrated on recorded graph inputs, as QuantizeLinear/DequantizeLinear
pairs in the standard domain (opset 21), by onnxruntime's quantizer with its QNN configuration
(onnxruntime.quantization.execution_providers.qnn.get_qnn_qdq_config: the data types and the
per-op rules the QNN HTP accepts, e.g. Softmax/Sigmoid output ranges pinned)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ExportError

ACTIVATION_TYPES = ("uint8", "uint16")

# onnxruntime's CPU provider fuses DequantizeLinear(int8 weight) + MatMul into MatMulNBits, whose
# default accuracy level (4) quantizes the float activation to int8 per block on the fly: an error
# the QDQ graph does not hold (a uint16 activation rounded to 8 bits; the real Gemma 3 270M's
# projections came out up to 2.5 % of their range off, bench/npu_divergence.py), and one the HTP
# does not make (it multiplies the uint16 codes exactly). Level 1 computes in float32.
CPU_QDQ_MATMUL_ACCURACY = ("session.qdq_matmulnbits_accuracy_level", "1")


def cpu_reference_options(options=None):
    """onnxruntime SessionOptions for running a QDQ graph on the CPU provider as the graph says
    (float arithmetic between each DequantizeLinear and QuantizeLinear): the reference the HTP's
    integer run is held to, and the CPU figures of bench/npu_quality.py."""
    import onnxruntime as ort

    options = options if options is not None else ort.SessionOptions()
    options.add_session_config_entry(*CPU_QDQ_MATMUL_ACCURACY)
    return options


def qdq_quantize(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], activations: str = "uint16",
                 weight_bits: int = 8) -> None:
    """Writes `dst`, the QDQ model of the float model `src`, its activation ranges taken (min/max)
    over running `src` on `feeds` (onnxruntime's CPU provider)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    if activations not in ACTIVATION_TYPES:
        raise ExportError(f"QDQ activations {activations!r}: choose one of {ACTIVATION_TYPES}")
    if weight_bits not in (4, 8):
        raise ExportError(f"QDQ weights of {weight_bits} bits: choose 4 or 8")
    if not feeds:
        raise ExportError("QDQ quantization needs calibration feeds (none were recorded)")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    config = get_qnn_qdq_config(
        str(src), Reader(),
        activation_type=QuantType.QUInt16 if activations == "uint16" else QuantType.QUInt8,
        weight_type=QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4,
        per_channel=True, weight_symmetric=True,
    )
    # (the calibrator keeps every intermediate tensor of every feed until the end; its
    # CalibMaxIntermediateOutputs option does not help: onnxruntime 1.32 drops each full batch
    # without merging its ranges)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice is for CNNs, printed per call
    try:
        quantize(str(src), str(dst), config)
    finally:
        root.setLevel(level)
