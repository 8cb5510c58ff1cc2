"""Audio encoder latency on this CPU: our static ONNX graph (fp32) vs eager transformers (a benchmark, not a test).

    python bench/audio_latency.py [--tiny] [--seconds 30] [--threads N] [--keep DIR] [--audio-file SPEECH.wav]

Builds the released architecture (Gemma3nAudioConfig defaults: 12 conformer layers, 1536 wide,
about 681M parameters) with random weights (no download), copies them into our export-friendly
encoder, exports it with external data, and times one run of each on the same padded 30 s features:
  eager: Gemma3nAudioEncoder + Gemma3nMultimodalEmbedder (+ the padding to 188 tokens)
  ours:  onnxruntime CPU on audio.onnx
  ours int8: the int8/int4 recipes' audio graph (passes/encoders.py: MatMulNBits 8-bit, int8 Conv kernels)
and prints the max abs difference between fp32 and eager, and the cosine of int8 to fp32 soft
embeddings (on --audio-file, e.g. CMU ARCTIC's arctic_a0007.wav as pysptk ships it, else on a tone
in noise). Needs about 12 GB of memory at full size.

Measured 2026-12-01 (full size, random weights, 30 s of tone in noise, 2 threads, shared 2-core
machine): eager 7.15 s, ours fp32 5.27-5.31 s (1.35x), ours int8 6.02-6.25 s; front end 113 ms;
audio graph 2743 MB fp32, 866 MB int8 (quantized in 23 s); max abs diff to eager 7.3e-6
(tolerance 4.5e-4); int8 soft-embedding cosine to fp32 0.99959 (lowest token 0.99945).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from gemma_export.audio_graph import export_audio  # noqa: E402
from gemma_export.graphs import save_with_external_data  # noqa: E402
from gemma_export.model.audio import audio_spec_from_config, load_audio_encoder  # noqa: E402
from gemma_runtime.audio_features import audio_features  # noqa: E402


class _Source:
    def __init__(self, tensors):
        self.tensors = tensors

    def names(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name):
        return self.tensors[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 32-wide tower (a smoke run)")
    ap.add_argument("--seconds", type=float, default=30.0, help="real audio before the padding to 30 s")
    ap.add_argument("--threads", type=int, default=0, help="threads for torch and onnxruntime (0: default)")
    ap.add_argument("--keep", type=Path, help="write audio.onnx here instead of a temp folder")
    ap.add_argument("--audio-file", type=Path, help="real audio (speech) to run instead of the synthetic tone")
    args = ap.parse_args()

    from transformers import Gemma3nAudioConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder, Gemma3nMultimodalEmbedder

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(hidden_size=32, conf_num_hidden_layers=2, conf_num_attention_heads=4,
                     sscp_conv_channel_size=[8, 4]) if args.tiny else {}
    text_hidden = 64 if args.tiny else 2048  # E4B; E2B is 2048 too
    cfg = Gemma3nAudioConfig(**overrides)
    torch.manual_seed(0)
    t = time.perf_counter()
    tower = Gemma3nAudioEncoder(cfg).eval()
    embed = Gemma3nMultimodalEmbedder(cfg, SimpleNamespace(hidden_size=text_hidden)).eval()
    print(f"eager model built: {sum(p.numel() for p in tower.parameters()) / 1e6:.1f}M tower parameters "
          f"({time.perf_counter() - t:.1f}s)")

    config = {"audio_config": cfg.to_dict(), "text_config": {"hidden_size": text_hidden, "vocab_size": 262_400}}
    tensors = {f"model.audio_tower.{k}": v for k, v in tower.state_dict().items()}
    tensors.update({f"model.embed_audio.{k}": v for k, v in embed.state_dict().items()})
    ours = load_audio_encoder(audio_spec_from_config(config), _Source(tensors))

    n = int(args.seconds * 16_000)
    rng = np.random.default_rng(0)
    wave = (0.3 * np.sin(2 * np.pi * 330 * np.arange(n) / 16_000) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    t = time.perf_counter()
    feats, mask = audio_features(*((args.audio_file,) if args.audio_file else (wave, 16_000)))
    what = args.audio_file or f"{args.seconds:g} s of tone in noise"
    print(f"front end (numpy, {what}): {(time.perf_counter() - t) * 1e3:.1f} ms")

    with torch.no_grad():
        t = time.perf_counter()
        out = tower(torch.from_numpy(feats), ~torch.from_numpy(mask), return_dict=True)
        ref = embed(inputs_embeds=out.last_hidden_state)
        pad = embed(input_ids=torch.tensor([[cfg.vocab_offset + cfg.vocab_size - 1]]))
        ref = torch.where(out.audio_mel_mask.unsqueeze(-1), pad, ref)
        ref = torch.cat([ref, pad.expand(1, 188 - ref.shape[1], -1)], dim=1).numpy()
        print(f"eager transformers fp32: {time.perf_counter() - t:.2f} s")
    del tower, embed, tensors

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        model = export_audio(ours)
        save_with_external_data(model, folder, "audio.onnx", "audio.onnx.data")
        del model, ours
        size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        print(f"export: {time.perf_counter() - t:.1f} s, {size:.0f} MB")
        opts = ort.SessionOptions()
        if args.threads:
            opts.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(folder / "audio.onnx"), opts, providers=["CPUExecutionProvider"])
        inputs = {"input_features": feats, "input_features_mask": mask}
        t = time.perf_counter()
        (got,) = session.run(None, inputs)
        first = time.perf_counter() - t
        t = time.perf_counter()
        session.run(None, inputs)
        print(f"ours onnxruntime fp32: first run {first:.2f} s, second {time.perf_counter() - t:.2f} s")
        del session
        _int8(folder, opts, inputs, got)
    err = float(np.abs(got - ref).max())
    print("eager vs ours fp32:", end=" ")
    print(f"max abs diff {err:.3g}, tolerance {1e-4 * max(1.0, float(np.abs(ref).max())):.3g}")


def _int8(folder: Path, opts, inputs: dict, fp32: np.ndarray) -> None:
    import onnxruntime as ort

    from gemma_export.passes import quantize_encoder_files
    from gemma_export.recipes import ENCODER_W8

    target = folder / "int8"
    target.mkdir(exist_ok=True)
    t = time.perf_counter()
    quantize_encoder_files(target, "audio.onnx", "audio.onnx.data", ENCODER_W8, "audio", source=folder)
    size = sum(f.stat().st_size for f in target.iterdir()) / 1e6
    print(f"int8 quantization: {time.perf_counter() - t:.1f} s, {size:.0f} MB")
    session = ort.InferenceSession(str(target / "audio.onnx"), opts, providers=["CPUExecutionProvider"])
    t = time.perf_counter()
    (got,) = session.run(None, inputs)
    first = time.perf_counter() - t
    t = time.perf_counter()
    session.run(None, inputs)
    print(f"ours onnxruntime int8: first run {first:.2f} s, second {time.perf_counter() - t:.2f} s")
    a, b = fp32.reshape(-1, fp32.shape[-1]), got.reshape(-1, fp32.shape[-1])
    per_token = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
    print(f"int8 vs fp32 soft embeddings: cosine {cos:.6f}, lowest per token {per_token.min():.6f}")


if __name__ == "__main__":
    main()
