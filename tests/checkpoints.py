"""Tiny random checkpoints in the exact Hugging Face layout, for the export-side tests.

Each builder makes a transformers model from a tiny config, randomizes every parameter (transformers
initializes norms to 0/1, AltUp coefficients to 0 and so on: parity with those proves nothing), and
writes it with `save_pretrained`, so the exporter reads what transformers writes. No tokenizer files:
these folders exercise `Model.generate_ids`.

Gemma 3n's multimodal layout (Gemma3nForConditionalGeneration) cannot be instantiated cheaply: its
vision tower is timm's MobileNetV5 (the smallest, `mobilenetv5_base`, has 83M parameters and no
size knobs in Gemma3nVisionConfig). `gemma3n_released` therefore saves a Gemma3nForCausalLM's
weights under the `model.language_model.` prefix, beside a few small tensors named as the released
checkpoints name their towers and embedders (`model.vision_tower.*`, `model.audio_tower.*`,
`model.embed_vision.*`, `model.embed_audio.*`) and the k/v weights of the KV-shared layers, in two
shards with an index, with a config.json written from a real `Gemma3nConfig` (tiny text config,
default vision/audio configs) whose architectures is ["Gemma3nForConditionalGeneration"]. Its eager
reference is the Gemma3nForCausalLM of the same weights (saved by `save_pretrained` beside it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

BOS, EOS, PAD = 2, 1, 0
VOCAB = 300
SLIDING, FULL = "sliding_attention", "full_attention"

# Checkpoints built here. gemma3n_released is the released Gemma 3n layout (see the module doc):
# ConditionalGeneration prefixes, two shards with an index, and k/v weights for the KV-shared layers.
FAMILIES = ("gemma", "gemma3_sw5", "gemma3_sw8", "gemma3_sw24", "gemma3n", "gemma3n_released")


def _common() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, head_dim=16,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, max_position_embeddings=256)


def gemma_config():
    from transformers import GemmaConfig

    return GemmaConfig(**_common(), intermediate_size=128, num_hidden_layers=3, num_key_value_heads=1)


def gemma3_config(sliding_window: int):
    """sliding_window 8 (= the tests' prefill chunk): untied LM head (lm_head.weight), so that
    random greedy generation does not collapse onto one token; 5 (< chunk): the same, a ring that
    a chunk's own rows overrun; 24 (> chunk): tied, linear rope scaling on the global layer,
    soft-cap fields set."""
    from transformers import Gemma3TextConfig

    rope = {  # two thetas, and linear scaling on the global layers (as Gemma 3 4B+ ship)
        FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    } if sliding_window > 8 else None
    return Gemma3TextConfig(
        **_common(), intermediate_size=128, num_hidden_layers=4, num_key_value_heads=2,
        sliding_window=sliding_window, layer_types=[SLIDING, SLIDING, SLIDING, FULL],
        query_pre_attn_scalar=24,  # != head_dim: the scale must come from the config
        rope_parameters=rope, tie_word_embeddings=sliding_window > 8,
        # set, though released Gemma 3 configs leave them null: the final soft-cap is applied by
        # the reference, the attention soft-cap is ignored by it (its attention never passes it on)
        final_logit_softcapping=5.0 if sliding_window > 8 else None,
        attn_logit_softcapping=3.0 if sliding_window > 8 else None,
    )


def gemma3n_text_config():
    from transformers import Gemma3nTextConfig

    s, f = SLIDING, FULL
    return Gemma3nTextConfig(
        **{k: v for k, v in _common().items() if k != "max_position_embeddings"},
        max_position_embeddings=256,
        vocab_size_per_layer_input=280, hidden_size_per_layer_input=8, intermediate_size=96,
        num_hidden_layers=6, num_key_value_heads=2, sliding_window=8, layer_types=[s, s, f, s, s, f],
        num_kv_shared_layers=3, laurel_rank=8, activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
    )


def _model_class(family: str):
    import transformers

    return {
        "gemma": transformers.GemmaForCausalLM,
        "gemma3_sw5": transformers.Gemma3ForCausalLM,
        "gemma3_sw8": transformers.Gemma3ForCausalLM,
        "gemma3_sw24": transformers.Gemma3ForCausalLM,
        "gemma3n": transformers.Gemma3nForCausalLM,
        "gemma3n_released": transformers.Gemma3nForCausalLM,  # the reference: same weights, text only
    }[family]


def _config(family: str):
    return {
        "gemma": gemma_config,
        "gemma3_sw5": lambda: gemma3_config(5),
        "gemma3_sw8": lambda: gemma3_config(8),
        "gemma3_sw24": lambda: gemma3_config(24),
        "gemma3n": gemma3n_text_config,
        "gemma3n_released": gemma3n_text_config,
    }[family]()


# std of the random weights (embeddings: 0.1). Gemma's tied tiny model needs larger layer weights
# for its greedy tokens not to repeat one token.
_WEIGHT_STD = {"gemma": 0.2}


def randomize(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Every parameter random: weights ~ N(0, std), embeddings ~ N(0, 0.1); norm scales and AltUp
    coefficients spread ~0.3 around their initial value (1 for Gemma 3n's w, 0 for Gemma's 1 + w)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "altup.correct" in name or "coefs" in name:
                p.copy_(p + 0.3 * noise)
            elif "embed" in name:
                p.copy_(0.1 * noise)
            else:
                p.copy_(std * noise)


def build(family: str, folder: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint of `family` into `folder` (created); return it."""
    if family == "gemma3n_released":
        return build_gemma3n_released(folder, seed)
    folder = Path(folder)
    cls = _model_class(family)
    torch.manual_seed(seed)
    model = cls(_config(family)).eval()
    randomize(model, seed, _WEIGHT_STD.get(family, 0.1))
    model.save_pretrained(folder)
    return folder


def reference(family: str, folder: Path):
    """The eager float32 transformers model of a checkpoint folder built here."""
    cls = _model_class(family)
    if family == "gemma3n_released":
        folder = Path(folder).parent / (Path(folder).name + ".causal_lm")  # the same weights in the text-only layout
    return cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


# Small stand-ins for the towers, named as the released Gemma 3n checkpoints name them.
_TOWER_TENSORS = {
    "model.vision_tower.timm_model.conv_stem.conv.weight": (4, 3, 3, 3),
    "model.vision_tower.timm_model.msfa.ffn.pw_proj.conv.weight": (4, 4, 1, 1),
    "model.audio_tower.subsample_conv_projection.conv_0.conv.weight": (4, 1, 3, 3),
    "model.audio_tower.conformer.0.attention.attn.q_proj.weight": (8, 8),
    "model.embed_vision.embedding.weight": (128, 8),
    "model.embed_vision.embedding_projection.weight": (64, 8),
    "model.embed_audio.embedding.weight": (128, 8),
    "model.embed_audio.hard_embedding_norm.weight": (8,),
}


def kv_shared_layers(text_config) -> list[int]:
    return list(range(text_config.num_hidden_layers - text_config.num_kv_shared_layers, text_config.num_hidden_layers))


def build_gemma3n_released(folder: Path, seed: int = 0) -> Path:
    """The released Gemma 3n layout: Gemma3nForConditionalGeneration prefixes (text weights under
    `model.language_model.`), tower stand-ins, k_proj/v_proj/k_norm/v_norm for the KV-shared layers
    (which transformers drops on load), two shards + model.safetensors.index.json, and a
    config.json from a real Gemma3nConfig. Its text-only twin (the reference) lies beside it in
    FOLDER.causal_lm."""
    from transformers import Gemma3nConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    twin = build("gemma3n", folder.parent / (folder.name + ".causal_lm"), seed)
    tensors = {}
    for name, value in load_file(twin / "model.safetensors").items():
        assert name.startswith("model."), name
        tensors["model.language_model." + name[len("model."):]] = value
    gen = torch.Generator().manual_seed(seed + 1)
    for name, shape in _TOWER_TENSORS.items():
        tensors[name] = torch.randn(shape, generator=gen)
    text_cfg = gemma3n_text_config()
    kv_dim = text_cfg.num_key_value_heads * text_cfg.head_dim
    tensors.update(shared_kv_extras(kv_shared_layers(text_cfg), "model.language_model.", kv_dim,
                                    text_cfg.hidden_size, text_cfg.head_dim))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    shard(folder, parts=2)
    text = json.loads((twin / "config.json").read_text())
    config = Gemma3nConfig(text_config=text).to_dict()
    config["architectures"] = ["Gemma3nForConditionalGeneration"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(twin / "generation_config.json", folder / "generation_config.json")
    return folder


def shared_kv_extras(layers: list[int], prefix: str, kv_dim: int, hidden: int, head_dim: int,
                     seed: int = 7) -> dict[str, torch.Tensor]:
    """k_proj/v_proj/k_norm/v_norm for KV-shared layers, as the released checkpoints carry them."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        base = f"{prefix}layers.{i}.self_attn."
        out[base + "k_proj.weight"] = torch.randn(kv_dim, hidden, generator=gen)
        out[base + "v_proj.weight"] = torch.randn(kv_dim, hidden, generator=gen)
        out[base + "k_norm.weight"] = torch.randn(head_dim, generator=gen)
        # the released checkpoints list v_norm too (a scale-free norm in the model)
        out[base + "v_norm.weight"] = torch.randn(head_dim, generator=gen)
    return out


def add_tensors(folder: Path, extra: dict[str, torch.Tensor], drop: tuple[str, ...] = ()) -> None:
    """Add tensors to / drop tensors from a checkpoint folder's safetensors, single file or sharded
    (the index's weight_map updated); new tensors go into the first shard."""
    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        shards = sorted(set(index["weight_map"].values()))
    else:
        index, shards = None, ["model.safetensors"]
    for n, shard in enumerate(shards):
        tensors = load_file(folder / shard)
        tensors = {k: v for k, v in tensors.items() if k not in drop}
        if n == 0:
            tensors.update(extra)
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        if index is not None:
            for k in list(index["weight_map"]):
                if k in drop:
                    del index["weight_map"][k]
            if n == 0:
                index["weight_map"].update({k: shard for k in extra})
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2))


def shard(folder: Path, parts: int = 2) -> None:
    """Split a single-file checkpoint into `parts` shards with a model.safetensors.index.json."""
    folder = Path(folder)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    weight_map, total = {}, 0
    for p in range(parts):
        file = f"model-{p + 1:05d}-of-{parts:05d}.safetensors"
        part = {n: tensors[n] for n in names[p::parts]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ---- driving an export -----------------------------------------------------------------------

PROMPT_LEN = 21  # three prefill chunks of 8, the last one partial


def prompt_ids(seed: int = 1) -> list[int]:
    """BOS + random ids, two of them past Gemma 3n's per-layer vocabulary (280: row 0)."""
    rng = np.random.default_rng(seed)
    ids = [BOS] + [int(i) for i in rng.integers(3, VOCAB, PROMPT_LEN - 1)]
    ids[5], ids[13] = VOCAB - 1, 285
    return ids


def runtime_logits(model, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """Prefill then `steps` greedy decode steps, driven through the runtime's own step (host
    embeddings, padding of the last chunk, KV cache writes): the logits of every step
    [steps + 1, V] and the greedy tokens fed."""
    chunk = model.manifest.prefill_chunk
    model._cache.reset()
    for first in range(0, len(prompt), chunk):
        last = model._step(np.asarray(prompt[first:first + chunk], dtype=np.int64), first, chunk)
    logits, tokens = [last[0]], []
    for k in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(model._step(np.asarray(tokens[-1:], dtype=np.int64), len(prompt) + k, 1)[0])
    return np.stack(logits), tokens


def teacher_forced_logits(model, ids: list[int], prompt_len: int = PROMPT_LEN) -> np.ndarray:
    """Logits [len(ids) - prompt_len + 1, V] of the runtime's own steps (a Model or an NpuModel):
    the first `prompt_len` ids prefilled in chunks, then one decode step per later id. Every model
    fed the same ids, their logits compare position by position."""
    chunk = model.manifest.prefill_chunk
    model.reset()
    for first in range(0, prompt_len, chunk):
        last = model._step(np.asarray(ids[first:min(first + chunk, prompt_len)], dtype=np.int64), first, chunk)
    rows = [last[0].copy()]
    for position in range(prompt_len, len(ids)):
        rows.append(model._step(np.asarray(ids[position:position + 1], dtype=np.int64), position, 1)[0].copy())
    return np.stack(rows)
