"""MatFormer slicing of Gemma 3n (gemma_export/matformer.py, slice_checkpoint.py).

On a tiny random E4B-shaped checkpoint (10 layers, the last 5 KV-shared, 4 sliding : 1 global as
in E4B, per-layer FFN sizes, the released layout's k/v weights for the shared layers) with a tiny
slicing table in the published CSV format: the `slice` subcommand's folder loads strictly in
transformers and its eager greedy tokens equal our export's (exported from the released
ConditionalGeneration layout, sliced on the fly); every kept tensor is exactly the slice of its
source tensor; the identity row gives the source back bit for bit; bad slices are refused with one
clear line. On the meta device, for the full-size E4B: the official E2B row gives exactly E2B's
shape, and every row of Google's table has its effective parameter count within 2%.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import (_TOWER_TENSORS, BOS, EOS, PAD, VOCAB, add_tensors, prompt_ids, randomize, shard,
                         shared_kv_extras)
from gemma_export import matformer
from gemma_export.checkpoint import open_folder
from gemma_export.cli import main
from gemma_export.variants import NAMED_VARIANTS, variant_from_config
from gemma_export.weights import RandomTensors

S, F = "sliding_attention", "full_attention"
LAYERS = 10
SHARED = 5  # layers 5..9 read the caches of layers 3 (sliding) and 4 (global)
SIZES = [128, 96, 128, 128, 128, 96, 128, 128, 128, 128]
P = 8  # hidden_size_per_layer_input
NEW_TOKENS = 32

TABLE = f"""name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped
Main model,10,0.0004,60.00%,"[{', '.join(f'32 * {s // 32}' for s in SIZES)}]",
Tiny E2B,8,0.0002,50.00%,"[32 * 2, 32 * 2, 32 * 2, 32 * 3, 32 * 2, 32 * 2, 32 * 2, 32 * 4]","[5, 6]"
Tiny mix,10,0.0003,55.00%,"[17, 96, 128, 40, 64, 1, 100, 128, 33, 64]",
Tiny no producer,9,0.0003,55.00%,"[64, 64, 64, 64, 64, 64, 64, 64, 64]",[4]
"""


def _config():
    from transformers import Gemma3nTextConfig

    return Gemma3nTextConfig(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, head_dim=16, num_key_value_heads=2,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, max_position_embeddings=256,
        vocab_size_per_layer_input=280, hidden_size_per_layer_input=P, intermediate_size=SIZES,
        num_hidden_layers=LAYERS, sliding_window=8, layer_types=[S, S, S, S, F] * 2,
        num_kv_shared_layers=SHARED, laurel_rank=8, activation_sparsity_pattern=[0.95, 0.95] + [0.0] * 8,
    )


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """causal: Gemma3nForCausalLM layout (save_pretrained + the shared layers' k/v, as released);
    released: the same weights in the released ConditionalGeneration layout (towers, 2 shards);
    table: the tiny slicing table."""
    from transformers import Gemma3nConfig, Gemma3nForCausalLM

    root = tmp_path_factory.mktemp("matformer")
    torch.manual_seed(0)
    model = Gemma3nForCausalLM(_config()).eval()
    randomize(model, seed=5)
    causal = root / "e4b_tiny"
    model.save_pretrained(causal)
    add_tensors(causal, shared_kv_extras(list(range(LAYERS - SHARED, LAYERS)), "model.", 32, 64, 16))

    released = root / "e4b_tiny_released"
    released.mkdir()
    tensors = {"model.language_model." + n.removeprefix("model."): t for n, t in load_file(causal / "model.safetensors").items()}
    gen = torch.Generator().manual_seed(1)
    tensors.update({n: torch.randn(s, generator=gen) for n, s in _TOWER_TENSORS.items()})
    save_file(tensors, released / "model.safetensors", metadata={"format": "pt"})
    shard(released, parts=2)
    config = Gemma3nConfig(text_config=json.loads((causal / "config.json").read_text())).to_dict()
    config["architectures"] = ["Gemma3nForConditionalGeneration"]
    (released / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(causal / "generation_config.json", released / "generation_config.json")

    table = root / "tiny-slicing.csv"
    table.write_text(TABLE)
    return {"causal": causal, "released": released, "table": table, "root": root}


def _slice(ckpts, source: str, name: str, out: Path, *extra: str) -> Path:
    rc = main(["slice", "--checkpoint", str(ckpts[source]), "--matformer", name,
               "--matformer-config", str(ckpts["table"]), "--quiet", *extra, str(out)])
    assert rc == 0
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    src = open_folder(folder).tensors
    return {n: src.get_stored(n) for n in src.names()}


def _expected(source: dict[str, torch.Tensor], prefix: str, kept: list[int], dims: list[int]) -> dict[str, torch.Tensor]:
    """The slice by the issue's rule, written out independently of matformer.py."""
    out = {}
    for name, t in source.items():
        m = re.fullmatch(re.escape(prefix) + r"layers\.(\d+)\.(.*)", name)
        if m:
            old, rest = int(m.group(1)), m.group(2)
            if old not in kept:
                continue
            new = kept.index(old)
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                t = t[:dims[new]]
            elif rest == "mlp.down_proj.weight":
                t = t[:, :dims[new]]
            out[f"{prefix}layers.{new}.{rest}"] = t
        elif name == prefix + "embed_tokens_per_layer.weight":
            out[name] = torch.cat([t[:, i * P:(i + 1) * P] for i in kept], dim=1)
        elif name == prefix + "per_layer_model_projection.weight":
            out[name] = torch.cat([t[i * P:(i + 1) * P] for i in kept], dim=0)
        else:
            out[name] = t
    return out


def test_sliced_checkpoint_loads_strictly_and_matches_the_export(ckpts):
    from gemma_runtime import Model
    from transformers import Gemma3nForCausalLM

    root = ckpts["root"]
    folder = _slice(ckpts, "causal", "Tiny E2B", root / "hf_tiny_e2b")
    ref, info = Gemma3nForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32,
                                                   output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    assert ref.config.num_hidden_layers == 8 and ref.config.num_kv_shared_layers == 3
    assert ref.config.intermediate_size == [64, 64, 64, 96, 64, 64, 64, 128]

    out = root / "export_tiny_e2b"  # from the released layout, sliced at export
    assert main(["--checkpoint", str(ckpts["released"]), "--matformer", "Tiny E2B", "--matformer-config",
                 str(ckpts["table"]), "--max-context", "64", "--prefill-chunk", "8", "--quiet", "--text-only",  # stand-in towers
                 str(out)]) == 0
    model = Model.load(out)
    record = model.manifest.provenance["matformer"]
    assert record["name"] == "Tiny E2B" and record["skipped_layers"] == [5, 6]
    assert record["ffn_dims"] == [64, 64, 64, 96, 64, 64, 64, 128] and record["mmlu_pt"] == "50.00%"
    # effective: the text decoder's tensors without the two embedding tables, k/v of shared layers in
    sliced = _tensors(folder)
    want = sum(t.numel() for n, t in sliced.items() if "embed_tokens" not in n)
    assert record["effective_params"] == want
    assert [c["layer"] for c in json.loads((out / "manifest.json").read_text())["caches"]] == [0, 1, 2, 3, 4]

    prompt = prompt_ids()
    ours = model.generate_ids(prompt, NEW_TOKENS)
    stop = set(model.manifest.tokens.stop)
    with torch.no_grad():
        gen = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=sorted(stop), pad_token_id=PAD)
    theirs = gen[0, len(prompt):].tolist()
    for i, t in enumerate(theirs):
        if t in stop:
            theirs = theirs[:i + 1]
            break
    print(f"\nmatformer greedy: {len(ours)} tokens, {len(set(ours))} distinct")
    assert ours == theirs and len(ours) >= 8


@pytest.mark.parametrize("name, kept, dims", [
    ("Tiny mix", list(range(LAYERS)), [17, 96, 128, 40, 64, 1, 100, 128, 33, 64]),
    ("Tiny E2B", [0, 1, 2, 3, 4, 7, 8, 9], [64, 64, 64, 96, 64, 64, 64, 128]),
])
def test_every_kept_tensor_is_the_slice_of_its_source(ckpts, name, kept, dims):
    src = ckpts["released"]
    aux = ckpts["root"] / f"released_aux_{len(kept)}"
    shutil.copytree(src, aux)
    for f in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        (aux / f).write_text("{}")
    ckpts[aux.name] = aux
    out = _slice(ckpts, aux.name, name, ckpts["root"] / f"hf_{name.replace(' ', '_')}", "--shard-size", "0.05")
    got = _tensors(out)
    want = _expected(_tensors(src), "model.language_model.", kept, dims)
    assert sorted(got) == sorted(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n
    assert any(n.startswith("model.vision_tower.") for n in got)  # towers pass through untouched
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(got)
    assert {"processor_config.json", "preprocessor_config.json", "tokenizer_config.json",
            "generation_config.json", "matformer_slice.json"} <= {p.name for p in out.iterdir()}
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] == len(kept) and text["intermediate_size"] == dims
    assert text["layer_types"] == [_config().layer_types[i] for i in kept]
    assert text["activation_sparsity_pattern"] == [0.95, 0.95] + [0.0] * (len(kept) - 2)
    assert text["num_kv_shared_layers"] == sum(1 for i in kept if i >= LAYERS - SHARED)
    # shared layers still read the same producers (layers 3 and 4 keep their numbers)
    v = variant_from_config(json.loads((out / "config.json").read_text()))
    assert {kept[i]: kept[v.kv_source(i)] for i in range(len(kept)) if v.kv_source(i) != i} == \
        {i: 3 if i % 5 != 4 else 4 for i in kept if i >= LAYERS - SHARED}


def test_identity_slice_gives_the_source_back_bit_for_bit(ckpts):
    src = ckpts["causal"]
    out = _slice(ckpts, "causal", "Main model", ckpts["root"] / "hf_identity")
    got, want = _tensors(out), _tensors(src)
    assert sorted(got) == sorted(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape
        assert got[n].contiguous().view(torch.uint8).equal(want[n].contiguous().view(torch.uint8)), n
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())


REFUSED = [
    (["--skip-layers", "4"], "skips layer 4, which produces the full_attention KV cache that KV-shared layer 9 reads"),
    (["--skip-layers", "1-3"], "skips layer 3, which produces the sliding_attention KV cache"),
    (["--matformer", "Tiny no producer"], "skips layer 4, which produces"),
    (["--skip-layers", "9,10"], "skipped layer(s) [10] out of range: the checkpoint has layers 0-9"),
    (["--skip-layers", "7,7"], "layer(s) [7] listed twice"),
    (["--ffn-dims", "64,64,64,64,64,64,64,64,64,200"], "layer 9 (layer 9 of the slice) would keep 200 FFN neurons, but it has 128"),
    (["--ffn-dims", "64,0,64,64,64,64,64,64,64,64"], "would keep 0 FFN neurons"),
    (["--ffn-dims", "64,64", "--skip-layers", "5"], "gives 2 FFN sizes for 9 kept layers"),
    (["--ffn-dims", "64,x"], "--ffn-dims: 'x' is not an integer"),
    (["--matformer", "Nope"], "no slice named 'Nope'"),
    (["--matformer", "Tiny E2B", "--ffn-dims", "64"], "give one or the other"),
]


@pytest.mark.parametrize("command, args, message", [("slice", *r) for r in REFUSED] + [
    ("export", *REFUSED[0]), ("export", *REFUSED[5])],  # the export shares the slice's checks
    ids=[f"slice-{i}" for i in range(len(REFUSED))] + ["export-0", "export-5"])
def test_refused_slices(ckpts, tmp_path, capsys, command, args, message):
    if "--matformer" in args and "--ffn-dims" not in args:
        args = [*args, "--matformer-config", str(ckpts["table"])]
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpts["causal"]), *args, "--quiet", str(out)]
    rc = main(["slice", *argv] if command == "slice" else argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("gemma-export: error: "), err
    assert message in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_slicing_other_families_is_refused(tiny, tmp_path, capsys):
    rc = main(["slice", "--checkpoint", str(tiny.checkpoint("gemma3_sw8")), "--skip-layers", "1", str(tmp_path / "o")])
    assert rc == 2 and "MatFormer slicing applies to Gemma 3n checkpoints" in capsys.readouterr().err


# ---- full size, meta device ------------------------------------------------------------------


class _Shapes:
    """Names and shapes of the released full-size layout (weights never made)."""

    def __init__(self, config: dict):
        variant = variant_from_config(config)
        random = RandomTensors(variant)
        self._shapes = {n: random.shape(n) for n in random.names()}
        kv = variant.num_kv_heads * variant.head_dim
        for i in range(variant.num_layers):
            if variant.kv_source(i) != i:  # the released checkpoints store these (transformers drops them)
                base = f"model.layers.{i}.self_attn."
                self._shapes |= {base + "k_proj.weight": (kv, variant.hidden_size), base + "v_proj.weight": (kv, variant.hidden_size),
                                 base + "k_norm.weight": (variant.head_dim,), base + "v_norm.weight": (variant.head_dim,)}

    def names(self):
        return list(self._shapes)

    def shape(self, name):
        return self._shapes[name]


@pytest.fixture(scope="module")
def e4b_shapes():
    return _Shapes(NAMED_VARIANTS["e4b"].config)


def test_official_e2b_row_gives_e2b_shape_on_meta(e4b_shapes):
    table = matformer.read_table()
    config, tensors, _ = matformer.slice_checkpoint(NAMED_VARIANTS["e4b"].config, e4b_shapes, table["Config for official E2B Model"])
    sliced = variant_from_config(config)
    e2b = variant_from_config(NAMED_VARIANTS["e2b"].config)
    assert sliced == e2b  # every field: 30 layers, FFN 8192, layer types, 10 KV-shared, sparsity
    assert sliced.num_layers == 30 and set(sliced.intermediate_sizes) == {8192} and sliced.gemma3n.num_kv_shared_layers == 10
    want = _Shapes(NAMED_VARIANTS["e2b"].config)  # the tensors too: E2B's names and shapes exactly
    assert {n: tensors.shape(n) for n in tensors.names()} == {n: want.shape(n) for n in want.names()}


@pytest.mark.parametrize("name", list(matformer.read_table()))
def test_effective_params_match_the_table(e4b_shapes, name):
    s = matformer.read_table()[name]
    _, tensors, _ = matformer.slice_checkpoint(NAMED_VARIANTS["e4b"].config, e4b_shapes, s)
    counts = matformer.parameter_counts(tensors, "Gemma3nForCausalLM")
    table = s.table_effective_params_b * 1e9
    print(f"\n{name}: effective {counts.effective / 1e9:.4f}B, table {s.table_effective_params_b}B "
          f"({100 * (counts.effective / table - 1):+.2f}%)")
    assert abs(counts.effective / table - 1) <= 0.02
