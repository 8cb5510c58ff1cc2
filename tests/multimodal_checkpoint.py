"""The tiny Gemma3nForConditionalGeneration checkpoint of the multimodal tests, and its fp32 export.

Tiny text and audio configs; the vision tower full-size (mobilenetv5_300m_enc has no smaller
variant) with seeded random weights whose layer scales make every block matter; saved with
save_pretrained, with a word-level tokenizer and the released preprocessor config, and exported
once per test session (conftest.py's `multimodal` fixture: the vision export is the slow part).
Its vocabulary is laid out like the released one, scaled down: text [0, 256), vision [256, 384),
audio [384, 512). `hf_processor` builds transformers' Gemma3nProcessor for it, offline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from checkpoints import BOS, EOS, PAD, randomize

TEXT_VOCAB, VISION_OFFSET, AUDIO_OFFSET, VOCAB = 256, 256, 384, 512
BOI, BOA, EOI, IMAGE, EOA, AUDIO = 251, 252, 256, 257, 384, 385
NEW_TOKENS = 16
MAX_CONTEXT, PREFILL_CHUNK = 1024, 64  # two images and two clips (904 placeholder ids) fit one prompt
NL = 108  # a text id standing in for "\n\n"


def gemma3n_config():
    from transformers import Gemma3nConfig

    s, f = "sliding_attention", "full_attention"
    text = dict(vocab_size=VOCAB, vocab_size_per_layer_input=TEXT_VOCAB, hidden_size=64, num_attention_heads=4,
                head_dim=16, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, max_position_embeddings=1024,
                hidden_size_per_layer_input=8, intermediate_size=96, num_hidden_layers=4, num_key_value_heads=2,
                sliding_window=8, layer_types=[s, f, s, f], num_kv_shared_layers=2, laurel_rank=8,
                activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0])
    audio = dict(hidden_size=32, conf_num_hidden_layers=2, conf_num_attention_heads=4, sscp_conv_channel_size=[8, 4],
                 vocab_size=128, vocab_offset=AUDIO_OFFSET)
    vision = dict(vocab_size=128, vocab_offset=VISION_OFFSET)
    return Gemma3nConfig(text_config=text, audio_config=audio, vision_config=vision, boi_token_id=BOI, eoi_token_id=EOI,
                         image_token_id=IMAGE, boa_token_id=BOA, eoa_token_id=EOA, audio_token_id=AUDIO)


def build_model():
    from transformers import Gemma3nForConditionalGeneration

    from gemma_export.model.vision import vision_spec_from_config
    from gemma_export.vision_weights import RandomVisionTensors

    config = gemma3n_config()
    torch.manual_seed(0)
    config.text_config._attn_implementation = "eager"
    model = Gemma3nForConditionalGeneration(config).eval()
    randomize(model.model.language_model, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(model.model.audio_tower.parameters()) + list(model.model.embed_audio.parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    raw = config.to_dict()
    vision = RandomVisionTensors(vision_spec_from_config(raw), seed=3, vocab_size=128)
    for module, prefix in ((model.model.vision_tower, "model.vision_tower."), (model.model.embed_vision, "model.embed_vision.")):
        state = {n[len(prefix):]: vision.get(n) for n in vision.names() if n.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    return model


SPECIAL = {PAD: "<pad>", EOS: "<eos>", BOS: "<bos>", 105: "<start_of_turn>", 106: "<end_of_turn>", NL: "\n\n",
           BOI: "<start_of_image>", BOA: "<start_of_audio>", EOI: "<end_of_image>", IMAGE: "<image_soft_token>",
           EOA: "<end_of_audio>", AUDIO: "<audio_soft_token>"}


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary: the Gemma special tokens at their ids
    (as added tokens, matched first), every other id a word "wN"."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {SPECIAL.get(i, f"w{i}"): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL.values()])
    tok.save(str(path))


# the names a released Gemma 3n tokenizer_config.json gives its multimodal tokens (Gemma3nProcessor reads them)
MULTIMODAL_TOKENS = {"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI,
                     "audio_token": AUDIO, "boa_token": BOA, "eoa_token": EOA}


def hf_processor(checkpoint: Path):
    """transformers' own Gemma3nProcessor for the checkpoint, built offline from its files: the
    tokenizer from tokenizer.json (with the multimodal token names a released tokenizer_config.json
    declares; the checkpoint has none), the PIL backend of the SigLIP image processor from
    preprocessor_config.json (the fast one resizes through torchvision, which pillow cannot match
    exactly), and the default Gemma3nAudioFeatureExtractor."""
    from transformers import (Gemma3nAudioFeatureExtractor, Gemma3nProcessor, PreTrainedTokenizerFast,
                              SiglipImageProcessorPil)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(checkpoint / "tokenizer.json"), bos_token=SPECIAL[BOS], eos_token=SPECIAL[EOS],
        pad_token=SPECIAL[PAD], extra_special_tokens={name: SPECIAL[i] for name, i in MULTIMODAL_TOKENS.items()})
    config = json.loads((checkpoint / "preprocessor_config.json").read_text())
    images = SiglipImageProcessorPil(**{k: v for k, v in config.items()
                                        if v is not None and k != "image_processor_type"})
    return Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(), image_processor=images,
                            tokenizer=tokenizer, audio_seq_length=188, image_seq_length=256)


def build(root: Path) -> tuple:
    """(eager model, fp32 export folder, seconds to build and save, seconds to export)."""
    from gemma_export.cli import main

    t = time.perf_counter()
    model = build_model()
    ckpt = root / "checkpoint"
    model.save_pretrained(ckpt)
    (ckpt / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessorFast", "do_convert_rgb": None, "do_normalize": False,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 2, "rescale_factor": 1 / 255, "size": {"height": 768, "width": 768}}))
    write_tokenizer(ckpt / "tokenizer.json")
    built_s = time.perf_counter() - t
    t = time.perf_counter()
    out = root / "out"
    assert main(["--checkpoint", str(ckpt), "--max-context", str(MAX_CONTEXT), "--prefill-chunk", str(PREFILL_CHUNK),
                 "--quiet", str(out)]) == 0
    return model, out, built_s, time.perf_counter() - t
