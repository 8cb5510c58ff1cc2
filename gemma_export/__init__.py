"""gemma-export: Gemma checkpoints to ONNX graphs for edge devices."""

__version__ = "0.1.0"
