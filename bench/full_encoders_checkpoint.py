"""A Gemma3nForConditionalGeneration checkpoint with full-size encoders and a tiny decoder, random
weights, in the Hugging Face layout (save_pretrained): for benchmarks of the encoders through the
whole export and runtime (bench/multimodal_rss.py), where the released weights are not at hand.

    python bench/full_encoders_checkpoint.py /work/cache/mm-fullenc-hf [--layers 4] [--intermediate 8192]
    gemma-export --checkpoint /work/cache/mm-fullenc-hf --quant int8 /work/cache/mm-fullenc-int8

Vision and audio as released in E2B (transformers' Gemma3nVisionConfig / Gemma3nAudioConfig
defaults: MobileNetV5-300M, the 12-layer 1536-wide USM conformer, ~300M + ~681M parameters); the
text side E2B's widths (hidden_size 2048, which the multimodal embedders project into; 8 heads of
256, 2 KV heads, per-layer inputs 256, Laurel 64, AltUp 4) but `--layers` layers (sliding/full
alternating, the second half KV-shared from 4 layers on) and the scaled-down vocabulary of the tiny multimodal test
checkpoint (tests/multimodal_checkpoint.py: text [0, 256), vision [256, 384), audio [384, 512), its
word-level tokenizer.json and the released preprocessor_config.json). So the text tables are a few
MiB where E2B's are GiB: memory figures of the decoder side are not E2B's, the encoders' are.

Weights: the decoder as the tests randomize it (tests/checkpoints.py), the vision tower from
RandomVisionTensors (layer scales ~0.5, so every block matters; timm's 1e-5 would make them
no-ops), the audio tower and both embedders transformers' own initialization (seeded).
About 5.0 GB on disk at --layers 4 (parameters: vision 294M + embedder 4.5M, audio 681M + 3.3M,
decoder 273M); built and saved in ~55 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny checkpoint's vocabulary

from checkpoints import BOS, EOS, PAD, randomize  # noqa: E402
from multimodal_checkpoint import (  # noqa: E402
    AUDIO,
    AUDIO_OFFSET,
    BOA,
    BOI,
    EOA,
    EOI,
    IMAGE,
    TEXT_VOCAB,
    VISION_OFFSET,
    VOCAB,
    write_tokenizer,
)

# the released Gemma 3n preprocessor_config.json (image side; the audio side is the extractor's defaults)
PREPROCESSOR = {"image_processor_type": "SiglipImageProcessorFast", "do_convert_rgb": None, "do_normalize": False,
                "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "resample": 2, "rescale_factor": 1 / 255, "size": {"height": 768, "width": 768}}


def config(layers: int = 4, intermediate: int = 8192):
    from transformers import Gemma3nConfig

    if layers < 2 or layers % 2:
        raise SystemExit("--layers: an even number, 2 or more (sliding/full pairs)")
    s, f = "sliding_attention", "full_attention"
    text = dict(vocab_size=VOCAB, vocab_size_per_layer_input=TEXT_VOCAB, hidden_size=2048, num_attention_heads=8,
                head_dim=256, num_key_value_heads=2, hidden_size_per_layer_input=256, intermediate_size=intermediate,
                num_hidden_layers=layers, layer_types=[s, f] * (layers // 2), num_kv_shared_layers=layers // 2 if layers >= 4 else 0,
                laurel_rank=64, altup_num_inputs=4, sliding_window=512, max_position_embeddings=32768,
                activation_sparsity_pattern=[0.95] + [0.0] * (layers - 1),
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return Gemma3nConfig(text_config=text, audio_config=dict(vocab_size=128, vocab_offset=AUDIO_OFFSET),
                         vision_config=dict(vocab_size=128, vocab_offset=VISION_OFFSET), boi_token_id=BOI,
                         eoi_token_id=EOI, image_token_id=IMAGE, boa_token_id=BOA, eoa_token_id=EOA,
                         audio_token_id=AUDIO)


def build_model(layers: int = 4, intermediate: int = 8192):
    from transformers import Gemma3nForConditionalGeneration

    from gemma_export.model.vision import vision_spec_from_config
    from gemma_export.vision_weights import RandomVisionTensors

    cfg = config(layers, intermediate)
    torch.manual_seed(0)
    model = Gemma3nForConditionalGeneration(cfg).eval()
    randomize(model.model.language_model, seed=0)
    vision = RandomVisionTensors(vision_spec_from_config(cfg.to_dict()), seed=3, vocab_size=128)
    for module, prefix in ((model.model.vision_tower, "model.vision_tower."), (model.model.embed_vision, "model.embed_vision.")):
        state = {n[len(prefix):]: vision.get(n) for n in vision.names() if n.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=8192)
    args = ap.parse_args()
    t = time.perf_counter()
    model = build_model(args.layers, args.intermediate)
    counts = {name: sum(p.numel() for p in getattr(model.model, name).parameters())
              for name in ("vision_tower", "embed_vision", "audio_tower", "embed_audio", "language_model")}
    built_s = time.perf_counter() - t
    model.save_pretrained(args.folder)
    (args.folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    write_tokenizer(args.folder / "tokenizer.json")
    size = sum(p.stat().st_size for p in args.folder.iterdir())
    print(json.dumps({"folder": str(args.folder), "parameters_M": {k: round(v / 1e6, 1) for k, v in counts.items()},
                      "built_s": round(built_s, 1), "saved_s": round(time.perf_counter() - t - built_s, 1),
                      "bytes": size}))


if __name__ == "__main__":
    main()
