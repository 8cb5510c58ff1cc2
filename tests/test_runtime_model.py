"""Model.load / generate end to end over a tiny fake decoder graph that honours the I/O contract.

The fake graph (built here with the onnx package; the runtime never imports it) computes

    new_key.i   = inputs_embeds @ Wk_i + bk_i        (bias: padding rows are non-zero)
    logits      = e[last valid] @ Wo + pli[last valid] @ Wp + position * wpos
                  + sum_i (sum_slot w_i[slot] * past_key.i[slot]) @ Gk_i   (same for values)

so the logits depend on what sits in every cache slot. The numpy reference below computes the
same from the token history alone (global slot = position, ring slot = position mod window),
never from a cache, so a wrong write, a written padding row or a wrong position changes the
logits it is compared with.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models

import gemma_runtime.model as model_module
from gemma_runtime import (
    ContextLengthError,
    GemmaRuntimeError,
    IntegrityError,
    ManifestError,
    Model,
    ProviderError,
    TokenizerMissingError,
)
from gemma_runtime.cli import main
from gemma_runtime.manifest import (
    FORMAT_VERSION,
    CacheSpec,
    GraphSpec,
    HostTable,
    Manifest,
    PerLayerInputs,
    TensorSpec,
    TokenIds,
)

PAD, EOS, BOS = 0, 1, 2


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_RUNTIME_CACHE_DIR", str(tmp_path / "verify-cache"))


# ---- the fake model --------------------------------------------------------------------------


@dataclass
class Fake:
    hidden: int = 8
    vocab: int = 32
    kv_heads: int = 2
    head_dim: int = 4
    chunk: int = 5
    max_context: int = 24
    window: int = 4
    per_layer: tuple[int, int, int] | None = None  # (num_layers, dim, vocab_size)
    int8_embed: bool = False
    stop: tuple[int, ...] = ()
    seed: int = 0
    scripted: dict | None = None  # token -> next token (a chain model for text tests)

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        H, V, KD = self.hidden, self.vocab, self.kv_heads * self.head_dim
        r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
        self.embed = r(V, H)
        if self.int8_embed:
            self.scales = (np.abs(self.embed).max(1) / 127).astype(np.float32)
            self.q = np.round(self.embed / self.scales[:, None]).astype(np.int8)
            self.embed = self.q.astype(np.float32) * self.scales[:, None]  # what the runtime sees
        self.wo = r(H, V)
        self.wpos = r(V) * 0.1
        self.layers = [("global", self.max_context), ("sliding", self.window)]
        self.wk = [r(H, KD) for _ in self.layers]
        self.bk = [r(KD) for _ in self.layers]
        self.wv = [r(H, KD) for _ in self.layers]
        self.bv = [r(KD) for _ in self.layers]
        self.slot_w = [r(length) for _, length in self.layers]
        self.gk = [r(KD, V) * 0.3 for _ in self.layers]
        self.gv = [r(KD, V) * 0.3 for _ in self.layers]
        if self.per_layer:
            L, P, pv = self.per_layer
            self.ple = r(pv, L * P)
            self.wp = r(L * P, V)
        if self.scripted is not None:  # one-hot embeddings, Wo = successor map, nothing else
            assert H == V
            self.embed = np.eye(V, dtype=np.float32)
            self.wo = np.zeros((H, V), np.float32)
            for i in range(V):
                self.wo[i, self.scripted.get(i, EOS)] = 1.0
            self.wpos[:] = 0
            for g in (*self.gk, *self.gv):
                g[:] = 0

    # -- numpy reference, from the token history --
    def kv(self, i, token_ids):
        e = self.embed[token_ids]
        k = (e @ self.wk[i] + self.bk[i]).reshape(-1, self.kv_heads, self.head_dim)
        v = (e @ self.wv[i] + self.bv[i]).reshape(-1, self.kv_heads, self.head_dim)
        return k, v

    def logits(self, seq, start, last):
        """Logits of a call whose chunk starts at `start` and whose last valid token is `last`."""
        seq = np.asarray(seq)
        out = self.embed[seq[last]].astype(np.float64) @ self.wo + start * self.wpos
        if self.per_layer:
            pid = seq[last] if seq[last] < self.per_layer[2] else 0
            out += self.ple[pid] @ self.wp
        for i, (kind, length) in enumerate(self.layers):
            past = range(start) if kind == "global" else range(max(0, start - length), start)
            k, v = self.kv(i, seq[list(past)]) if len(past) else (np.zeros((0,)), np.zeros((0,)))
            sk = np.zeros((self.kv_heads, self.head_dim))
            sv = np.zeros((self.kv_heads, self.head_dim))
            for j, p in enumerate(past):
                slot = p if kind == "global" else p % length
                sk += self.slot_w[i][slot] * k[j]
                sv += self.slot_w[i][slot] * v[j]
            out += sk.reshape(-1) @ self.gk[i] + sv.reshape(-1) @ self.gv[i]
        return out

    def generate(self, prompt, max_new):
        """Greedy reference: (new ids, logits of every step)."""
        seq, n, out, all_logits = list(prompt), len(prompt), [], []
        logits = self.logits(seq, (n - 1) // self.chunk * self.chunk, n - 1)
        while True:
            all_logits.append(logits)
            out.append(int(np.argmax(logits)))
            if out[-1] in self.stop or len(out) >= max_new or n + len(out) >= self.max_context:
                return out, all_logits
            seq.append(out[-1])
            logits = self.logits(seq, len(seq) - 1, len(seq) - 1)

    # -- the export folder --
    def write(self, out, tokenizer: Tokenizer | None = None, external_data=True):
        out.mkdir(parents=True, exist_ok=True)
        onnx_model = self.graph()
        if external_data:
            onnx.save(onnx_model, str(out / "decoder.onnx"), save_as_external_data=True,
                      location="decoder.data", size_threshold=100)
        else:
            onnx.save(onnx_model, str(out / "decoder.onnx"))
        tables = {}
        if self.int8_embed:
            data = self.q.tobytes()
            (out / "embed_tokens.bin").write_bytes(data + self.scales.tobytes())
            tables["embed_tokens"] = HostTable("embed_tokens.bin", "int8", self.embed.shape, 0, "per_row",
                                               "float32", len(data))
        else:
            (out / "embed_tokens.bin").write_bytes(self.embed.tobytes())
            tables["embed_tokens"] = HostTable("embed_tokens.bin", "float32", self.embed.shape)
        pli = None
        if self.per_layer:
            (out / "per_layer.bin").write_bytes(self.ple.tobytes())
            tables["per_layer"] = HostTable("per_layer.bin", "float32", self.ple.shape)
            pli = PerLayerInputs(*self.per_layer)
        if tokenizer is not None:
            tokenizer.save(str(out / "tokenizer.json"))
        names = [p.name for p in out.iterdir() if p.name != "manifest.json"]
        files = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in sorted(names)}
        graph_spec = GraphSpec(
            "decoder.onnx", "decoder.data" if external_data else None,
            tuple(TensorSpec(i.name, _np_name(i), _shape(i)) for i in onnx_model.graph.input),
            tuple(TensorSpec(o.name, _np_name(o), _shape(o)) for o in onnx_model.graph.output),
        )
        manifest = Manifest(
            format_version=FORMAT_VERSION, family="gemma3n" if self.per_layer else "gemma3", variant=None,
            architecture="Fake", quant="int8" if self.int8_embed else "fp32", target="cpu",
            hidden_size=self.hidden, vocab_size=self.vocab, prefill_chunk=self.chunk,
            max_context=self.max_context, sliding_window=self.window, graphs={"decoder": graph_spec},
            kv_layout="past_and_new_blocks", caches=self.cache_specs(), tables=tables, per_layer_inputs=pli,
            tokens=TokenIds(bos=BOS, eos=EOS, pad=PAD, stop=self.stop), files=files,
            tokenizer_files=("tokenizer.json",) if tokenizer else (),
        )
        (out / "manifest.json").write_text(manifest.to_json())
        return out

    def cache_specs(self):
        return tuple(
            CacheSpec(i, kind, length, self.kv_heads, self.head_dim, f"past_key.{i}", f"past_value.{i}",
                      f"new_key.{i}", f"new_value.{i}")
            for i, (kind, length) in enumerate(self.layers)
        )

    def graph(self):
        H, V, KH, D = self.hidden, self.vocab, self.kv_heads, self.head_dim
        inits, nodes = [], []

        def const(name, array):
            inits.append(numpy_helper.from_array(np.asarray(array), name))
            return name

        def node(op, ins, out, **attrs):
            nodes.append(helper.make_node(op, ins, [out], **attrs))
            return out

        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        inputs = [helper.make_tensor_value_info("inputs_embeds", f32, [1, "T", H])]
        outputs = [helper.make_tensor_value_info("logits", f32, [1, V])]
        idx = node("Sub", ["valid", const("one", np.array([1], np.int64))], "idx")
        last = node("Reshape", [node("Gather", ["inputs_embeds", idx], "last3", axis=1),
                                const("shape_1h", np.array([1, H], np.int64))], "last")
        terms = [node("MatMul", [last, const("wo", self.wo)], "t_wo")]
        pos_f = node("Cast", ["position"], "pos_f", to=f32)
        terms.append(node("Mul", [pos_f, const("wpos", self.wpos)], "t_pos"))
        if self.per_layer:
            L, P, _ = self.per_layer
            inputs.append(helper.make_tensor_value_info("per_layer_inputs", f32, [1, "T", L, P]))
            pl = node("Reshape", [node("Gather", ["per_layer_inputs", idx], "pl4", axis=1),
                                  const("shape_lp", np.array([1, L * P], np.int64))], "pl")
            terms.append(node("MatMul", [pl, const("wp", self.wp)], "t_pl"))
        inputs += [helper.make_tensor_value_info("position", i64, [1]),
                   helper.make_tensor_value_info("valid", i64, [1])]
        for i, (_, length) in enumerate(self.layers):
            for kv, w, b, g in (("key", self.wk[i], self.bk[i], self.gk[i]),
                                ("value", self.wv[i], self.bv[i], self.gv[i])):
                past, new = f"past_{kv}.{i}", f"new_{kv}.{i}"
                inputs.append(helper.make_tensor_value_info(past, f32, [1, KH, length, D]))
                outputs.append(helper.make_tensor_value_info(new, f32, [1, KH, "T", D]))
                proj = node("Add", [node("MatMul", ["inputs_embeds", const(f"w{kv}{i}", w)], f"mm_{new}"),
                                    const(f"b{kv}{i}", b)], f"proj_{new}")
                split = node("Reshape", [proj, const(f"sh_{new}", np.array([1, -1, KH, D], np.int64))],
                             f"split_{new}")
                node("Transpose", [split], new, perm=[0, 2, 1, 3])
                weighted = node("Mul", [past, const(f"sw{kv}{i}", self.slot_w[i].reshape(1, 1, length, 1))],
                                f"wt_{past}")
                summed = node("ReduceSum", [weighted, const(f"ax_{past}", np.array([2], np.int64))],
                              f"sum_{past}", keepdims=0)
                flat = node("Reshape", [summed, const(f"fl_{past}", np.array([1, KH * D], np.int64))],
                            f"flat_{past}")
                terms.append(node("MatMul", [flat, const(f"g{kv}{i}", g)], f"t_{past}"))
        total = terms[0]
        for j, t in enumerate(terms[1:]):
            total = node("Add", [total, t], "logits" if j == len(terms) - 2 else f"acc{j}")
        graph = helper.make_graph(nodes, "fake_decoder", inputs, outputs, inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _np_name(value_info):
    return {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64"}[value_info.type.tensor_type.elem_type]


def _shape(value_info):
    return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)


def record_logits(monkeypatch):
    seen = []
    real = model_module.greedy

    def spy(logits):
        seen.append(np.array(logits, dtype=np.float64).reshape(-1))
        return real(logits)

    monkeypatch.setattr(model_module, "greedy", spy)
    return seen


# ---- generation mechanics against the reference -----------------------------------------------


@pytest.mark.parametrize(
    "fake",
    [Fake(), Fake(per_layer=(2, 3, 20), seed=1), Fake(int8_embed=True, seed=2)],
    ids=["gemma3-like", "gemma3n-per-layer", "int8-embed-table"],
)
@pytest.mark.parametrize("io_binding", [True, False], ids=["bound", "feeds"])
def test_generate_ids_matches_reference(tmp_path, monkeypatch, fake, io_binding):
    model = Model.load(fake.write(tmp_path / "out"), io_binding=io_binding)
    # 12 tokens: chunks of 5, 5 and a padded 2; generation wraps the 4-slot ring several times.
    prompt = [BOS, 25, 7, 30, 21, 3, 9, 28, 14, 22, 5, 31]
    seen = record_logits(monkeypatch)
    got = model.generate_ids(prompt, max_new_tokens=10)
    want, want_logits = fake.generate(prompt, 10)
    assert got == want and len(got) == 10
    assert len(seen) == len(want_logits)
    for step, (a, b) in enumerate(zip(seen, want_logits)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"step {step}")
    stats = model.last_stats
    assert stats.prompt_tokens == 12 and stats.decode_tokens == 9
    assert stats.time_to_first_token >= stats.prefill_seconds > 0 and stats.decode_seconds > 0
    # A second call starts from a clean cache: same answer.
    assert model.generate_ids(prompt, max_new_tokens=10) == want


def test_decode_steps_reuse_the_bound_buffers(tmp_path, monkeypatch):
    """The IOBinding loop hands onnxruntime the same memory every step: the logits buffer, the
    KV cache buffers (never replaced, written in place) and no per-step allocation of either."""
    model = Model.load(Fake(per_layer=(2, 3, 20)).write(tmp_path / "out"))
    cache = model._cache.keys + model._cache.values
    pointers = [b.ctypes.data for b in cache]
    seen = []  # the logits arrays themselves (kept alive, so a fresh array per step would differ)
    real = model_module.greedy
    monkeypatch.setattr(model_module, "greedy", lambda logits: seen.append(logits) or real(logits))
    model.generate_ids([BOS, 25, 7, 30, 21, 3, 9, 28], max_new_tokens=6)
    assert len(seen) == 6 and all(logits is seen[0] for logits in seen)
    assert [b.ctypes.data for b in model._cache.keys + model._cache.values] == pointers


def test_a_device_provider_binds_the_host_inputs_again_before_every_run(tmp_path, monkeypatch):
    """On CUDA, onnxruntime copies a bound host input to the device when it is bound, not when the
    graph runs: inputs bound once gave zero logits on an H200 (bench/cuda_provider.py). A binding
    for a provider other than the CPU binds every input again before each run, and generates what
    the reference does."""
    import onnxruntime as ort

    fake = Fake(per_layer=(2, 3, 20), seed=1)
    model = Model.load(fake.write(tmp_path / "out"))
    assert model._binding.host_inputs_rebound is False  # the CPU reads the host memory itself
    model._binding.host_inputs_rebound = True
    bound, runs = [], []
    real_bind, real_run = ort.IOBinding.bind_cpu_input, ort.InferenceSession.run_with_iobinding
    monkeypatch.setattr(ort.IOBinding, "bind_cpu_input", lambda self, name, a: bound.append(name) or real_bind(self, name, a))
    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding",
                        lambda self, b, *rest: runs.append(len(bound)) or real_run(self, b, *rest))
    prompt = [BOS, 25, 7, 30, 21, 3, 9, 28, 14, 22, 5, 31]
    want, _ = fake.generate(prompt, 8)
    assert model.generate_ids(prompt, max_new_tokens=8) == want
    inputs = {i.name for i in model._session.get_inputs()}
    per_run = np.diff([0, *runs])
    # the first run of each chunk length binds its inputs once when made, then again before it runs
    assert set(per_run) <= {len(inputs), 2 * len(inputs)} and sum(per_run == len(inputs)) >= len(runs) - 3
    assert set(bound) == inputs


def test_stop_token_ends_generation(tmp_path):
    free, _ = Fake().generate([BOS, 4, 5, 6], 12)
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # first-time token, not the first
    fake = Fake(stop=(free[k],))
    model = Model.load(fake.write(tmp_path / "out"))
    assert model.generate_ids([BOS, 4, 5, 6], max_new_tokens=12) == free[: k + 1]


def test_context_limit(tmp_path):
    fake = Fake()
    model = Model.load(fake.write(tmp_path / "out"))
    prompt = [BOS] + [(7 * i) % 30 + 2 for i in range(fake.max_context - 4)]  # 21 of 24 positions
    got = model.generate_ids(prompt, max_new_tokens=50)
    assert len(prompt) + len(got) == fake.max_context  # stops when full, no error
    assert got == fake.generate(prompt, 50)[0]
    for bad in ([], [BOS] * fake.max_context):
        with pytest.raises(ContextLengthError, match=f"has {len(bad)} tokens.*{fake.max_context}"):
            model.generate_ids(bad)
    assert model.generate_ids(prompt, max_new_tokens=0) == []


def test_stream_cannot_outlive_a_new_generation(tmp_path):
    model = Model.load(Fake().write(tmp_path / "out"))
    it = model._generate([BOS, 5], 5)
    next(it)
    model.generate_ids([BOS, 6], max_new_tokens=2)
    with pytest.raises(GemmaRuntimeError, match="another generation"):
        next(it)


# ---- load-time checks ----------------------------------------------------------------------------


def test_integrity_is_checked_before_any_session(tmp_path, monkeypatch):
    out = Fake().write(tmp_path / "out")
    Model.load(out)  # a cached success first
    data = bytearray((out / "decoder.data").read_bytes())
    data[-1] ^= 1
    (out / "decoder.data").write_bytes(bytes(data))

    def no_session(*a, **k):
        raise AssertionError("a session was created before the files were verified")

    monkeypatch.setattr(model_module.ort, "InferenceSession", no_session)
    with pytest.raises(IntegrityError, match="decoder.data"):
        Model.load(out)


def test_unknown_provider_lists_available_ones(tmp_path):  # more in test_runtime_providers.py
    out = Fake().write(tmp_path / "out")
    with pytest.raises(ProviderError, match="'NoSuchExecutionProvider'.*available: .*CPUExecutionProvider"):
        Model.load(out, provider="NoSuchExecutionProvider")


def test_manifest_and_graph_must_agree(tmp_path):
    out = Fake().write(tmp_path / "out")
    raw = json.loads((out / "manifest.json").read_text())
    extra = dict(raw["caches"][1], layer=7, past_key="past_key.7", past_value="past_value.7",
                 new_key="new_key.7", new_value="new_value.7")
    raw["caches"].append(extra)
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="lacks inputs past_key.7, past_value.7"):
        Model.load(out)


def test_manifest_version_mismatch(tmp_path, capsys):
    out = Fake().write(tmp_path / "out")
    raw = json.loads((out / "manifest.json").read_text())
    raw["format_version"] = FORMAT_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=f"version {FORMAT_VERSION + 1} is not supported"):
        Model.load(out)
    assert main([str(out), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemma-run: error: manifest format version") and err.count("\n") == 1


def test_unsupported_kv_layout(tmp_path):
    out = Fake().write(tmp_path / "out")
    raw = json.loads((out / "manifest.json").read_text())
    raw["kv_layout"] = "group_query_attention"
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="kv_layout 'group_query_attention'"):
        Model.load(out)


def test_single_file_graph_without_external_data(tmp_path):
    fake = Fake(seed=3)
    model = Model.load(fake.write(tmp_path / "out", external_data=False))
    assert model.generate_ids([BOS, 3, 4], max_new_tokens=4) == fake.generate([BOS, 3, 4], 4)[0]


# ---- text: tokenizer, streaming, CLI ---------------------------------------------------------


TEXT = "hié가🙂"


def tokenizer() -> Tokenizer:
    """Byte-fallback BPE (Gemma-like): letters are tokens, other characters are UTF-8 bytes."""
    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": 3}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz ":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    return tok


@pytest.fixture
def text_model(tmp_path):
    """A chain model whose greedy output after <bos> is TEXT's tokens, then <eos>."""
    tok = tokenizer()
    chain = tok.encode(TEXT).ids
    assert len(set(chain)) == len(chain) and len(chain) > len(TEXT)  # distinct, and characters split
    z = tok.token_to_id("z")  # prompt "z" (not in TEXT) also leads into the chain
    succ = {BOS: chain[0], z: chain[0], **dict(zip(chain, [*chain[1:], EOS]))}
    size = tok.get_vocab_size()
    fake = Fake(hidden=size, vocab=size, stop=(EOS,), scripted=succ)
    return fake.write(tmp_path / "out", tokenizer=tok), chain


def test_generate_text_and_stream(text_model):
    out, chain = text_model
    model = Model.load(out)
    assert model.encode("hi") == [BOS, *tokenizer().encode("hi").ids]  # BOS added once
    assert model.generate_ids(model.encode(""), max_new_tokens=50) == [*chain, EOS]
    assert model.generate("z", max_new_tokens=50) == TEXT  # stop token's text left out
    pieces = list(model.generate("z", max_new_tokens=50, stream=True))
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces) and len(pieces) == len(TEXT)
    assert model.last_stats.decode_tokens == len(chain)  # stats recorded for the stream too


def test_stream_cut_mid_character_matches_the_plain_result(text_model):
    out, chain = text_model
    model = Model.load(out)
    n = 4  # h, i and the first byte of é
    plain = model.generate("z", max_new_tokens=n)
    assert plain == tokenizer().decode(chain[:n])
    assert "".join(model.generate("z", max_new_tokens=n, stream=True)) == plain


def test_bos_not_doubled_when_the_tokenizer_adds_it(text_model, tmp_path):
    from tokenizers.processors import TemplateProcessing

    out, _ = text_model
    model = Model.load(out)
    tok = tokenizer()
    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    model._tokenizer = tok
    assert model.encode("hi") == tok.encode("hi").ids and model.encode("hi").count(BOS) == 1


def test_missing_tokenizer(tmp_path, capsys):
    fake = Fake()
    model = Model.load(fake.write(tmp_path / "out"))
    with pytest.raises(TokenizerMissingError, match="no tokenizer.json.*generate_ids"):
        model.generate("hello")
    assert model.generate_ids([BOS, 4], max_new_tokens=3) == fake.generate([BOS, 4], 3)[0]
    assert main([str(tmp_path / "out"), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer.json" in err and "generate_ids" in err


def test_cli_streams_the_completion_and_stats(text_model, capsys):
    out, chain = text_model
    assert main([str(out), "z", "--max-new-tokens", "50", "--threads", "1", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == TEXT + "\n"
    assert "prompt: 2 tokens" in captured.err and "tok/s" in captured.err


def test_cli_usage_errors(text_model, capsys):
    out, _ = text_model
    for argv in ([str(out)], [str(out), "hi", "--max-new-tokens", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "PROMPT is required (or --chat)" in capsys.readouterr().err


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gemma_runtime.cli", str(tmp_path / "nowhere"), "hi"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("gemma-run: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and "not a folder" in proc.stderr


def test_too_old_onnxruntime_is_refused(tmp_path):
    out = Fake().write(tmp_path / "out")
    raw = json.loads((out / "manifest.json").read_text())
    raw["provenance"] = {"min_onnxruntime": "99.1"}
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(GemmaRuntimeError, match=r"needs onnxruntime >= 99.1"):
        Model.load(out)
    raw["provenance"] = {"min_onnxruntime": "1.0"}
    (out / "manifest.json").write_text(json.dumps(raw))
    Model.load(out)
