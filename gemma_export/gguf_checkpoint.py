"""GGUF files (llama.cpp's format) as a ``Checkpoint`` in the Hugging Face layout.

Tensors are dequantized one at a time on ``get`` (``gguf.quants.dequantize``) to float32 and
renamed by a declared map, architecture by architecture. The config is built from the GGUF
metadata plus declared defaults for what GGUF does not store. The tokenizer files are made once
per GGUF file (keyed by its sha256) with transformers' GGUF tokenizer conversion and cached.

Facts about llama.cpp's conversion that this module undoes or relies on:
- Gemma and Gemma 3 RMSNorm weights are stored as ``w + 1`` (``convert_hf_to_gguf.py``: the
  norm shift for every tensor whose name ends in ``norm.weight``, q/k norms included), because
  llama.cpp's RMSNorm multiplies by ``w`` where Gemma's multiplies by ``1 + w``. We subtract 1
  (as transformers' GGUF loader does). The stored value is the float32 of ``w + 1``, so the
  recovered ``w`` can differ from the original bf16 value in its last bits.
- q/k projections are NOT permuted for Gemma (llama.cpp permutes them for ``llama`` only;
  Gemma uses NEOX-style rope, which is Hugging Face's rotate_half layout).
- GGUF lists dimensions fastest-first: a GGUF ``[in, out]`` matrix is Hugging Face ``[out, in]``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import Checkpoint, file_sha256
from .errors import CheckpointError

__all__ = ["GGUF_ARCHITECTURES", "GgufArch", "GgufSource", "cache_root", "gguf_config", "open_gguf"]

# Bump when the files made from a GGUF (tokenizer, generation_config) change.
_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# declared architectures: GGUF tensor-name templates -> Hugging Face templates


@dataclass(frozen=True)
class TensorRule:
    gguf: str  # GGUF name template ({i}: layer index)
    hf: str  # Hugging Face name template
    norm_shift: bool = False  # llama.cpp stored (w + 1): subtract 1


@dataclass(frozen=True)
class GgufArch:
    name: str  # general.architecture
    rules: tuple[TensorRule, ...]
    build_config: Callable[["_Meta"], dict]


def _layer_rules(norm: dict[str, str], extra: tuple[TensorRule, ...] = ()) -> tuple[TensorRule, ...]:
    rules = [
        TensorRule("token_embd.weight", "model.embed_tokens.weight"),
        TensorRule("output_norm.weight", "model.norm.weight", norm_shift=True),
        TensorRule("output.weight", "lm_head.weight"),  # present only when not tied
        TensorRule("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
        TensorRule("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
        TensorRule("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
        TensorRule("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
        TensorRule("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
        TensorRule("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
        TensorRule("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ]
    rules += [TensorRule(f"blk.{{i}}.{g}.weight", f"model.layers.{{i}}.{h}.weight", norm_shift=True) for g, h in norm.items()]
    return tuple(rules) + extra


_GEMMA3_RULES = _layer_rules(
    {
        "attn_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    }
)
# Gemma (v1): one norm before attention, one before the MLP (which Hugging Face calls
# post_attention_layernorm); no q/k norms.
_GEMMA_RULES = _layer_rules({"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"})


# --------------------------------------------------------------------------------------------
# metadata


class _Meta:
    """Typed access to a GGUFReader's metadata."""

    def __init__(self, reader: Any):
        self.reader = reader
        self.fields = reader.fields
        self.arch = str(self.get("general.architecture", required=True))

    def has(self, key: str) -> bool:
        return key.replace("{arch}", self.arch) in self.fields

    def get(self, key: str, default: Any = None, required: bool = False) -> Any:
        key = key.replace("{arch}", self.arch) if "{" in key else key
        f = self.fields.get(key)
        if f is None:
            if required:
                raise CheckpointError(f"GGUF metadata has no {key!r}, which the export needs")
            return default
        return f.contents()

    def array_len(self, key: str) -> int:
        f = self.fields.get(key)
        return 0 if f is None else len(f.data)

    def token_id(self, text: str) -> int | None:
        """Id of the token spelled ``text`` in tokenizer.ggml.tokens, or None."""
        f = self.fields.get("tokenizer.ggml.tokens")
        if f is None:
            return None
        want = text.encode("utf-8")
        for i, idx in enumerate(f.data):
            if bytes(f.parts[idx]) == want:
                return i
        return None

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]


def _f32(x: Any) -> float:
    """GGUF stores floats as float32: recover the shortest decimal (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


def _token_ids(m: _Meta) -> dict:
    out = {}
    for hf, key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        v = m.get(key)
        out[hf] = None if v is None else int(v)
    return out


def _common(m: _Meta) -> dict:
    heads = int(m.get("{arch}.attention.head_count", required=True))
    key_len = m.get("{arch}.attention.key_length")
    value_len = m.get("{arch}.attention.value_length")
    hidden = int(m.get("{arch}.embedding_length", required=True))
    # GGUF omits key_length when it equals hidden / heads (llama.cpp's default).
    head_dim = int(key_len) if key_len is not None else hidden // heads
    if value_len is not None and int(value_len) != head_dim:
        raise CheckpointError(
            f"GGUF metadata: attention.value_length {value_len} != key_length {head_dim}; not a Gemma layout"
        )
    vocab = m.array_len("tokenizer.ggml.tokens")
    if vocab == 0:
        raise CheckpointError("GGUF metadata has no tokenizer.ggml.tokens; the vocabulary is needed")
    names = m.tensor_names()
    return {
        "hidden_size": hidden,
        "intermediate_size": int(m.get("{arch}.feed_forward_length", required=True)),
        "num_hidden_layers": int(m.get("{arch}.block_count", required=True)),
        "num_attention_heads": heads,
        # absent means multi-head attention (llama.cpp's default: head_count_kv = head_count)
        "num_key_value_heads": int(m.get("{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(m.get("{arch}.attention.layer_norm_rms_epsilon", required=True)),
        "max_position_embeddings": int(m.get("{arch}.context_length", required=True)),
        "vocab_size": vocab,
        # llama.cpp writes output.weight only when the LM head is not the embedding table
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,  # Gemma has no attention biases (none in the GGUF tensor list either)
        "dtype": "float32",  # tensors come out dequantized to float32
        **_token_ids(m),
    }


def _rope_scaling(m: _Meta) -> dict | None:
    kind = m.get("{arch}.rope.scaling.type")
    if kind is None or str(kind) == "none":
        return None
    if str(kind) == "linear":
        return {"rope_type": "linear", "factor": _f32(m.get("{arch}.rope.scaling.factor", required=True))}
    raise CheckpointError(f"GGUF metadata: rope scaling {kind!r} is not supported for {m.arch}")


def _gemma3_config(m: _Meta) -> dict:
    c = _common(m)
    n = c["num_hidden_layers"]
    # Every 6th layer is full (global) attention, the rest sliding: Gemma 3's fixed pattern.
    # Older GGUFs do not store it; newer llama.cpp may write the pattern, which wins.
    pattern = m.get("{arch}.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per-layer booleans: True = sliding
        if len(pattern) != n:
            raise CheckpointError(f"GGUF metadata: sliding_window_pattern has {len(pattern)} entries for {n} layers")
        layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        pattern = int(pattern)
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    full = {"rope_type": "default", "rope_theta": _f32(m.get("{arch}.rope.freq_base", 1_000_000.0))}
    scaling = _rope_scaling(m)  # Gemma 3 4B+ scale the global layers' rope (linear, factor 8)
    if scaling is not None:
        full.update(scaling)
    # The sliding layers' rope base: 10000 in every Gemma 3 (GGUF stores it only as freq_base_swa
    # in newer llama.cpp versions).
    local = {"rope_type": "default", "rope_theta": _f32(m.get("{arch}.rope.freq_base_swa", 10_000.0))}
    # Attention scale 1/sqrt(query_pre_attn_scalar): head_dim for every Gemma 3 except 27B, which
    # uses hidden_size / heads (llama.cpp: the same rule, keyed on the 62-layer 27B model).
    scalar = c["hidden_size"] // c["num_attention_heads"] if n == 62 else c["head_dim"]
    final_cap = m.get("{arch}.final_logit_softcapping")
    attn_cap = m.get("{arch}.attn_logit_softcapping")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **c,
        "hidden_activation": "gelu_pytorch_tanh",  # Gemma 3's MLP activation; GGUF does not store it
        "sliding_window": int(m.get("{arch}.attention.sliding_window", required=True)),
        "layer_types": layer_types,
        "rope_parameters": {"full_attention": full, "sliding_attention": local},
        "query_pre_attn_scalar": scalar,
        # Gemma 3 has no soft-caps (Gemma 2 had them); honour them if a GGUF declares them
        "final_logit_softcapping": None if final_cap is None else _f32(final_cap),
        "attn_logit_softcapping": None if attn_cap is None else _f32(attn_cap),
        "use_bidirectional_attention": False,  # causal LM
    }


def _gemma_config(m: _Meta) -> dict:
    c = _common(m)
    return {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        **c,
        "hidden_act": "gelu_pytorch_tanh",  # Gemma's MLP activation; GGUF does not store it
        # Gemma (v1) uses rope base 10000; llama.cpp's converter does not write it
        "rope_parameters": {"rope_type": "default", "rope_theta": _f32(m.get("{arch}.rope.freq_base", 10_000.0))},
    }


GGUF_ARCHITECTURES: dict[str, GgufArch] = {
    "gemma3": GgufArch("gemma3", _GEMMA3_RULES, _gemma3_config),
    "gemma": GgufArch("gemma", _GEMMA_RULES, _gemma_config),
}


def _arch(reader: Any) -> tuple[GgufArch, _Meta]:
    m = _Meta(reader)
    arch = GGUF_ARCHITECTURES.get(m.arch)
    if arch is None:
        raise CheckpointError(
            f"GGUF architecture {m.arch!r} is not supported (supported: {', '.join(sorted(GGUF_ARCHITECTURES))})"
        )
    return arch, m


def gguf_config(reader: Any) -> dict:
    """A Hugging Face config.json-style dict from a GGUFReader's metadata and declared defaults."""
    arch, m = _arch(reader)
    return arch.build_config(m)


# --------------------------------------------------------------------------------------------
# tensors


def _name_map(arch: GgufArch, num_layers: int) -> dict[str, TensorRule]:
    """Concrete GGUF name -> rule (with the HF name filled in) for every layer."""
    out: dict[str, TensorRule] = {}
    for r in arch.rules:
        if "{i}" in r.gguf:
            for i in range(num_layers):
                out[r.gguf.format(i=i)] = TensorRule(r.gguf.format(i=i), r.hf.format(i=i), r.norm_shift)
        else:
            out[r.gguf] = r
    return out


class GgufSource:
    """TensorSource over a GGUF file: Hugging Face names, float32, dequantized on ``get``."""

    def __init__(self, path: Path, reader: Any, arch: GgufArch, num_layers: int):
        self.path = path
        rules = _name_map(arch, num_layers)
        self._tensors: dict[str, tuple[Any, TensorRule]] = {}
        self._gguf_names: dict[str, str] = {}
        unmapped = []
        for t in reader.tensors:
            rule = rules.get(t.name)
            if rule is None:
                unmapped.append(t.name)
                continue
            self._tensors[rule.hf] = (t, rule)
            self._gguf_names[rule.hf] = t.name
        if unmapped:
            raise CheckpointError(
                f"{path}: GGUF tensor(s) with no Hugging Face name in the {arch.name} map: "
                f"{', '.join(unmapped[:5])}{' ...' if len(unmapped) > 5 else ''}"
            )

    def names(self) -> list[str]:
        return list(self._tensors)

    def gguf_name(self, name: str) -> str:
        return self._gguf_names[name]

    def shape(self, name: str) -> tuple[int, ...]:
        t, _ = self._entry(name)
        return tuple(int(d) for d in reversed(t.shape))

    def gguf_tensor(self, name: str) -> Any:
        """The reader's tensor (GGUF name, dims, quantization type, raw data) behind ``name``."""
        return self._entry(name)[0]

    def quant_type(self, name: str) -> str:
        return self._entry(name)[0].tensor_type.name

    def _entry(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def get(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t, rule = self._entry(name)
        shape = self.shape(name)
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {t.name}: cannot dequantize {t.tensor_type.name}: {e}") from e
        arr = np.array(arr, dtype=np.float32, copy=True).reshape(shape)
        if rule.norm_shift:
            arr -= np.float32(1.0)
        return torch.from_numpy(arr)


# --------------------------------------------------------------------------------------------
# tokenizer and generation config, made once per GGUF file


def cache_root() -> Path:
    """``$GEMMA_EXPORT_CACHE``, else ``$XDG_CACHE_HOME/gemma_export``, else ``~/.cache/gemma_export``."""
    env = os.environ.get("GEMMA_EXPORT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gemma_export"


_TOKENIZER_LOCK = threading.Lock()


def _generation_config(m: _Meta) -> dict:
    ids = _token_ids(m)
    eos = [] if ids["eos_token_id"] is None else [ids["eos_token_id"]]
    # Gemma's chat turns end with <end_of_turn>; the released generation_config.json of Gemma
    # (3) lists it beside <eos> as a stop token, and GGUF does not store the list.
    eot = m.token_id("<end_of_turn>")
    if eot is not None and eot not in eos:
        eos.append(eot)
    gen: dict[str, Any] = {
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": eos if len(eos) != 1 else eos[0],
        "pad_token_id": ids["pad_token_id"],
    }
    # Newer llama.cpp files may carry the model's recommended sampling settings.
    sampling = {
        "top_k": ("general.sampling.top_k", int),
        "top_p": ("general.sampling.top_p", _f32),
        "min_p": ("general.sampling.min_p", _f32),
        "temperature": ("general.sampling.temp", _f32),
    }
    found = {k: conv(m.get(key)) for k, (key, conv) in sampling.items() if m.get(key) is not None}
    if found:
        gen.update(found, do_sample=True)
    return gen


def _tokenizer_files(path: Path, sha: str, m: _Meta) -> Path:
    """Folder with tokenizer.json, tokenizer_config.json, generation_config.json for this GGUF."""
    folder = cache_root() / "gguf-tokenizers" / f"{sha}-v{_CACHE_VERSION}"
    done = folder / ".complete"
    if done.is_file():
        return folder
    with _TOKENIZER_LOCK:
        if done.is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:16]}-", dir=folder.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it is an ordinary cache folder
        try:
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
                tok.save_pretrained(str(tmp))
            except Exception as e:  # noqa: BLE001 - transformers raises many types here
                raise CheckpointError(
                    f"{path}: transformers could not convert the GGUF tokenizer: {type(e).__name__}: {e}"
                ) from e
            if not (tmp / "tokenizer.json").is_file():
                raise CheckpointError(f"{path}: transformers' GGUF tokenizer conversion wrote no tokenizer.json")
            (tmp / "generation_config.json").write_text(json.dumps(_generation_config(m), indent=2) + "\n")
            (tmp / ".complete").write_text("")
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished first (folder exists, not empty)
                if not done.is_file():
                    shutil.rmtree(folder, ignore_errors=True)
                    os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------------------------
# entry point


def _reader(path: Path) -> Any:
    """A gguf.GGUFReader over a plain ndarray view of its memory map.

    GGUFReader slices its np.memmap once per metadata element; a memmap slice costs ~10x a plain
    ndarray slice, so a 262k-token vocabulary took 8 s to parse; over a plain view (still backed
    by the same map, nothing read eagerly) it takes ~2.5 s.
    """
    import gguf

    class _PlainViewReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return _PlainViewReader(path)


def open_gguf(path: str | Path, source: str | None = None) -> Checkpoint:
    """Open a GGUF file as a Checkpoint in the Hugging Face layout."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CheckpointError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        reader = _reader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError/struct errors/IndexError
        raise CheckpointError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e}); download it again") from e
    arch, m = _arch(reader)
    config = arch.build_config(m)
    tensors = GgufSource(path, reader, arch, config["num_hidden_layers"])
    embed = tensors.shape("model.embed_tokens.weight") if "model.embed_tokens.weight" in tensors.names() else None
    if embed is None or embed != (config["vocab_size"], config["hidden_size"]):
        raise CheckpointError(
            f"{path}: token embedding shape {embed} does not match the vocabulary "
            f"({config['vocab_size']}) x embedding_length ({config['hidden_size']})"
        )
    sha = file_sha256(path)
    folder = _tokenizer_files(path, sha, m)
    aux = {
        name: folder / name
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "chat_template.jinja",
            "special_tokens_map.json",
        )
        if (folder / name).is_file()
    }
    return Checkpoint(
        source=str(path) if source is None else source,
        config=config,
        tensors=tensors,
        aux_files=aux,
        file_hashes={path.name: sha},
    )
