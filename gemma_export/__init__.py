"""gemma-export: Gemma checkpoints to ONNX graphs for edge devices."""
