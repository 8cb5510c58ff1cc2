"""onnxruntime-genai's model.onnx as a LogitsSource (evaluate.py), to score it on the same token ids.

onnxruntime-genai's builder writes one decoder graph: input_ids [B, S], attention_mask [B, total],
past_key_values.N.key/value [B, kv_heads, past, head_size] (sliding layers: a bounded window cache,
GroupQueryAttention's sliding_window_cache), logits [B, S, V] for every input position, and
present.N.key/value. Fed chunk by chunk with its presents as the next pasts, it gives the
teacher-forced logits of every position, like gemma-export eval's all-positions variant.

The ids must come from the same tokenizer as the reference export (the builder copies the
checkpoint's tokenizer.json; bench/genai_quality.py checks the two files are identical).
Only onnxruntime and numpy here, no onnxruntime-genai: the graph runs on plain onnxruntime.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .errors import ExportError


def _plain_sliding_cache(model) -> None:
    """GroupQueryAttention's sliding_window_cache=1 (the builder's default for sliding layers) wants
    a preallocated cache of at least the window that onnxruntime-genai's runtime manages; set to 0,
    the sliding layers take a growing past like the global ones. Only the cache's storage changes:
    local_window_size (512) still masks what each query attends to, and no weight is touched."""
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            for a in node.attribute:
                if a.name == "sliding_window_cache":
                    a.i = 0


class GenaiSource:
    """Teacher-forced logits of a folder written by onnxruntime_genai.models.builder (a LogitsSource)."""

    def __init__(self, folder: Path, threads: int | None = None, label: str | None = None):
        import onnx
        import onnxruntime as ort

        folder = Path(folder)
        config_file = folder / "genai_config.json"
        if not config_file.is_file():
            raise ExportError(f"{folder}: no genai_config.json; not a folder written by onnxruntime-genai's builder")
        decoder = json.loads(config_file.read_text())["model"]["decoder"]
        self.head_size = int(decoder["head_size"])
        self.names = decoder["inputs"], decoder["outputs"]
        self.layers = int(decoder["num_hidden_layers"])
        model_file = folder / decoder["filename"]
        model = onnx.load(str(model_file), load_external_data=False)
        bits = sorted({a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"})
        self.quant = "fp32" if not bits else "/".join(f"int{b}" for b in bits)
        _plain_sliding_cache(model)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # the graph is handed over in memory; its weights stay in the build's folder
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder.resolve()))
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        del model
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.label = label or str(folder)
        self.seconds = 0.0
        self.past: dict[str, np.ndarray] = {}
        self.length = 0
        self.reset()

    def _past_names(self) -> list[tuple[str, str]]:
        ins, outs = self.names
        return [(ins[kind] % i, outs[kind.replace("past", "present")] % i)
                for i in range(self.layers) for kind in ("past_key_names", "past_value_names")]

    def reset(self) -> None:
        """Empty caches: [1, kv_heads, 0, head_size] for every layer (the head size may be symbolic)."""
        self.past = {}
        for name, _ in self._past_names():
            dims = [1 if d == "batch_size" else self.head_size if d == "kv_cache_dim" else 0 if isinstance(d, str) else d
                    for d in self.inputs[name].shape]
            self.past[name] = np.zeros(dims, dtype=np.float32)
        self.length = 0

    def chunk_logits(self, ids: np.ndarray, position: int, chunk: int) -> np.ndarray:
        if position != self.length:
            raise ExportError(f"genai source: chunk at position {position} after {self.length} tokens; feed segments in order")
        start = time.perf_counter()
        n = int(ids.size)
        ins, outs = self.names
        feeds = {ins["input_ids"]: np.asarray(ids, dtype=np.int64)[None],
                 ins["attention_mask"]: np.ones((1, position + n), dtype=np.int64), **self.past}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(position, position + n, dtype=np.int64)[None]
        pairs = self._past_names()
        logits, *presents = self.session.run([outs["logits"], *(p for _, p in pairs)], feeds)
        self.past = {past: present for (past, _), present in zip(pairs, presents)}
        self.length += n
        self.seconds += time.perf_counter() - start
        return logits[0].astype(np.float32, copy=False)
