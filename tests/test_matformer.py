"""MatFormer slicing of Gemma 3n (gemma_export/matformer.py, slice_checkpoint.py).

On a tiny random E4B-shaped checkpoint (10 layers, the last 5 KV-shared, 4 sliding : 1 global as
in E4B, per-layer FFN sizes, the released layout's k/v weights for the shared layers) with a tiny
slicing table in the published CSV format: the `slice` subcommand's folder loads strictly in
transformers and its eager greedy tokens equal our export's (exported from the released
ConditionalGeneration layout, sliced on the fly); every kept tensor is exactly the slice of its
source tensor; the identity row gives the source back bit for bit; bad slices are refused with one
clear line; the line `gemma-export` prints after a sliced export says the manifest's counts and the
folder's real size. On the multimodal checkpoint (tests/multimodal_checkpoint.py, the session's
`multimodal` fixture: real tiny audio tower, full-size vision tower), in the released layout: the
slice loads strictly as a Gemma3nForConditionalGeneration with every tower tensor bit for bit the
source's, and a sliced export's vision/audio files are byte for byte the unsliced export's, its
audio path giving the eager sliced model's greedy tokens. On the meta device, for the full-size
E4B: the official E2B row gives exactly E2B's shape, and every row of Google's table has its
effective parameter count within 2%.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
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


_LINE = re.compile(
    r"gemma-export: MatFormer slice '(?P<name>[^']*)': (?P<layers>\d+) of (?P<source>\d+) layers, "
    r"effective (?P<effective>[\d,.B]+) parameters \(embedding tables excluded\), total (?P<total>[\d,.B]+)"
    r"(?:; vision/audio towers (?P<towers>[\d,.B]+) more \(not sliced\))?"
    r"(?:; table: (?P<table>[\d.]+)B effective, MMLU PT (?P<mmlu>[\d.]+%))?"
    r"; export on disk (?P<mib>[\d.]+) MiB")


def _count(text: str) -> float:
    """A count as the line prints it: 146,568 or 1.913B."""
    return float(text[:-1]) * 1e9 if text.endswith("B") else int(text.replace(",", ""))


def _check_printed_line(stdout: str, out: Path, record: dict) -> None:
    """The line `gemma-export` prints after a sliced export says what the manifest's record says
    (exact counts below 1e8, else within the printed 3 decimals of a billion) and the export's real
    size on disk (every file under out/, apparent size, in MiB to one decimal)."""
    lines = [line for line in stdout.splitlines() if "MatFormer slice" in line]
    assert len(lines) == 1, stdout
    m = _LINE.fullmatch(lines[0])
    assert m, lines[0]
    assert m["name"] == record["name"]
    assert (int(m["layers"]), int(m["source"])) == (len(record["ffn_dims"]), record["source_layers"])
    for key, field in (("effective", "effective_params"), ("total", "total_params"), ("towers", "non_text_params")):
        if field not in record:
            assert m[key] is None, lines[0]
            continue
        assert abs(_count(m[key]) - record[field]) <= (0 if record[field] < 1e8 else 5e5), (key, lines[0])
    assert (m["mmlu"], m["table"] and float(m["table"])) == (record.get("mmlu_pt"), record.get("table_effective_params_b"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert m["mib"] == f"{size / 2**20:.1f}", (lines[0], size)
    wrote = re.search(r"gemma-export: wrote .* \(gemma3n, fp32, (\d+) MiB\) in \d+ s", stdout)
    assert wrote and int(wrote[1]) == round(size / 2**20), stdout


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


def test_sliced_checkpoint_loads_strictly_and_matches_the_export(ckpts, capsys):
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
    capsys.readouterr()
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
    assert record["total_params"] == sum(t.numel() for t in sliced.values())  # + both embedding tables
    assert "non_text_params" not in record  # --text-only: the stand-in towers are not exported
    assert [c["layer"] for c in json.loads((out / "manifest.json").read_text())["caches"]] == [0, 1, 2, 3, 4]
    _check_printed_line(capsys.readouterr().out, out, record)

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
    row = table["Config for official E2B Model"]
    config, tensors, plan = matformer.slice_checkpoint(NAMED_VARIANTS["e4b"].config, e4b_shapes, row)
    sliced = variant_from_config(config)
    e2b = variant_from_config(NAMED_VARIANTS["e2b"].config)
    assert sliced == e2b  # every field: 30 layers, FFN 8192, layer types, 10 KV-shared, sparsity
    assert sliced.num_layers == 30 and set(sliced.intermediate_sizes) == {8192} and sliced.gemma3n.num_kv_shared_layers == 10
    want = _Shapes(NAMED_VARIANTS["e2b"].config)  # the tensors too: E2B's names and shapes exactly
    assert {n: tensors.shape(n) for n in tensors.names()} == {n: want.shape(n) for n in want.names()}
    # the line printed for it: billions to 3 decimals, beside the table's figures
    counts = matformer.parameter_counts(tensors, "Gemma3nForCausalLM")
    m = _LINE.fullmatch("gemma-export: " + matformer.describe(matformer.slice_record(row, plan, counts, None))
                        + "; export on disk 0.0 MiB")
    assert m and (m["layers"], m["source"], m["table"], m["mmlu"]) == ("30", "35", "1.91", row.mmlu_pt), m
    assert m["effective"] == f"{counts.effective / 1e9:.3f}B" and m["total"] == f"{counts.total / 1e9:.3f}B"
    assert abs(_count(m["effective"]) - 1.91e9) <= 0.02 * 1.91e9 and m["towers"] is None


@pytest.mark.parametrize("name", list(matformer.read_table()))
def test_effective_params_match_the_table(e4b_shapes, name):
    s = matformer.read_table()[name]
    _, tensors, _ = matformer.slice_checkpoint(NAMED_VARIANTS["e4b"].config, e4b_shapes, s)
    counts = matformer.parameter_counts(tensors, "Gemma3nForCausalLM")
    table = s.table_effective_params_b * 1e9
    print(f"\n{name}: effective {counts.effective / 1e9:.4f}B, table {s.table_effective_params_b}B "
          f"({100 * (counts.effective / table - 1):+.2f}%)")
    assert abs(counts.effective / table - 1) <= 0.02


# ---- the multimodal layout: towers untouched ----------------------------------------------------
# The multimodal checkpoint of tests/multimodal_checkpoint.py (the session's `multimodal` fixture:
# Gemma3nForConditionalGeneration saved by save_pretrained; tiny text with 4 layers [s, f, s, f], the
# last 2 KV-shared; a real tiny audio tower; the full-size vision tower) and its unsliced export.

MM_SLICE = ["--skip-layers", "3", "--ffn-dims", "48,96,64"]  # layer 3 (global, KV-shared, reads layer 1) goes
MM_TEXT = "model.language_model."


def _run(argv: list[str]) -> str:
    """gemma_export.cli.main(argv), which must succeed; its stdout."""
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    assert rc == 0, stderr.getvalue()
    return stdout.getvalue()


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def mm(multimodal, tmp_path_factory):
    """The multimodal checkpoint in the released layout: its weights file as shard 1 (a link, not a
    copy of its 1.1 GB), the KV-shared layers' k/v weights (which the released checkpoints carry)
    in shard 2, with an index; and its slice (`gemma-export slice`), with what that printed."""
    from safetensors import safe_open

    model, unsliced, *_ = multimodal
    ckpt = unsliced.parent / "checkpoint"
    root = tmp_path_factory.mktemp("matformer_mm")
    src = root / "released"
    src.mkdir()
    for f in ckpt.iterdir():
        if f.name != "model.safetensors":
            shutil.copyfile(f, src / f.name)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    (src / first).symlink_to(ckpt / "model.safetensors")
    text = model.config.text_config
    shared = list(range(text.num_hidden_layers - text.num_kv_shared_layers, text.num_hidden_layers))
    extras = shared_kv_extras(shared, MM_TEXT, text.num_key_value_heads * text.head_dim, text.hidden_size, text.head_dim)
    save_file(extras, src / second, metadata={"format": "pt"})
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        weight_map = {n: first for n in f.keys()}
    total = sum((src / n).stat().st_size for n in (first, second))  # informational in HF indexes
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map | {n: second for n in extras}}))

    hf = root / "hf_sliced"
    slice_stdout = _run(["slice", "--checkpoint", str(src), *MM_SLICE, "--quiet", str(hf)])
    yield {"model": model, "unsliced": unsliced, "src": src, "hf": hf, "slice_stdout": slice_stdout, "root": root}
    shutil.rmtree(root, ignore_errors=True)  # two more GB-sized folders: not kept past this module


@pytest.fixture(scope="module")
def mm_export(mm):
    """The sliced export of the released-layout multimodal checkpoint (vision + audio: ~1 min)."""
    from multimodal_checkpoint import MAX_CONTEXT, PREFILL_CHUNK

    out = mm["root"] / "export_sliced"
    stdout = _run(["--checkpoint", str(mm["src"]), *MM_SLICE, "--max-context", str(MAX_CONTEXT),
                   "--prefill-chunk", str(PREFILL_CHUNK), "--quiet", str(out)])
    return out, stdout


def test_sliced_multimodal_checkpoint_loads_strictly_with_its_towers_untouched(mm):
    from transformers import Gemma3nForConditionalGeneration

    hf, src = mm["hf"], mm["src"]
    ref, info = Gemma3nForConditionalGeneration.from_pretrained(hf, dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    text = ref.config.text_config
    assert (text.num_hidden_layers, text.num_kv_shared_layers, text.intermediate_size) == (3, 1, [48, 96, 64])
    assert text.layer_types == [S, F, S]

    got, want = open_folder(hf).tensors, open_folder(src).tensors
    towers = [n for n in want.names() if not n.startswith(MM_TEXT)]
    assert {n for n in got.names() if not n.startswith(MM_TEXT)} == set(towers)
    prefixes = {n.split(".")[1] for n in towers}
    assert prefixes == {"vision_tower", "audio_tower", "embed_vision", "embed_audio"}, prefixes
    for n in towers:  # bit for bit, in the stored dtype, one tensor at a time
        a, b = got.get_stored(n), want.get_stored(n)
        assert a.dtype == b.dtype and a.shape == b.shape and a.contiguous().view(torch.uint8).equal(
            b.contiguous().view(torch.uint8)), n
    # and the text decoder is the slice of the source's, by the rule written out above
    source_text = {n: want.get_stored(n) for n in want.names() if n.startswith(MM_TEXT)}
    expected = _expected(source_text, MM_TEXT, [0, 1, 2], [48, 96, 64])
    assert sorted(n for n in got.names() if n.startswith(MM_TEXT)) == sorted(expected)
    for n, t in expected.items():
        assert torch.equal(got.get_stored(n), t), n

    record = json.loads((hf / "matformer_slice.json").read_text())
    assert record["non_text_params"] == sum(want.get_stored(n).numel() for n in towers)
    assert record["total_params"] == sum(t.numel() for t in expected.values())
    # what `gemma-export slice` printed: the record's counts (towers apart) and its weight file's size
    lines = mm["slice_stdout"].splitlines()
    assert len(lines) == 2 and lines[0] == f"gemma-export: {matformer.describe(record)}", lines
    assert f"; vision/audio towers {record['non_text_params'] / 1e9:.3f}B more (not sliced)" in lines[0]
    size = (hf / "model.safetensors").stat().st_size
    assert re.fullmatch(rf"gemma-export: wrote {re.escape(str(hf))} \(1 safetensors file\(s\), "
                        rf"{size / 2**20:.0f} MiB\) in \d+ s", lines[1]), lines[1]


def test_sliced_multimodal_export_has_the_unsliced_encoders(mm, mm_export):
    """Item 5: the encoders of a sliced export are those of the unsliced export, file for file; the
    line printed after the export matches its record and size; its audio path gives the eager
    sliced model's greedy tokens."""
    from gemma_runtime import Model
    from gemma_runtime.audio_features import audio_features
    from multimodal_checkpoint import AUDIO, BOA, EOA, NEW_TOKENS, NL

    out, stdout = mm_export
    unsliced = mm["unsliced"]
    for name in ("vision.onnx", "vision.data", "audio.onnx", "audio.data", "embed_tokens.bin", "preprocessor_config.json"):
        assert _sha256(out / name) == _sha256(unsliced / name), name
    assert _sha256(out / "per_layer.bin") != _sha256(unsliced / "per_layer.bin")  # 3 of 4 layers' columns
    assert (out / "per_layer.bin").stat().st_size == 3 * (unsliced / "per_layer.bin").stat().st_size // 4
    ours, theirs = json.loads((out / "manifest.json").read_text()), json.loads((unsliced / "manifest.json").read_text())
    for graph in ("vision", "audio"):
        assert ours["graphs"][graph] == theirs["graphs"][graph]
    assert ours["tokens"] == theirs["tokens"]
    record = ours["provenance"]["matformer"]
    slice_record = json.loads((mm["hf"] / "matformer_slice.json").read_text())
    assert record == {k: v for k, v in slice_record.items() if k != "source"}
    _check_printed_line(stdout, out, record)

    # the audio path of the sliced export = the eager sliced ConditionalGeneration model, token for token
    from transformers import Gemma3nForConditionalGeneration

    ref = Gemma3nForConditionalGeneration.from_pretrained(mm["hf"], dtype=torch.float32, attn_implementation="eager").eval()
    t = np.arange(int(2.5 * 16_000)) / 16_000
    wave = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * np.random.default_rng(1).standard_normal(t.size)
    clip = (wave.astype(np.float32), 16_000)
    ids = [BOS, 105, 30, 31, NL, BOA, *[AUDIO] * 188, EOA, NL, 40, 41, 106, 33]
    model = Model.load(out)
    got = model.generate_ids(ids, max_new_tokens=NEW_TOKENS, audio=[clip])
    features, mask = audio_features(*clip, padding="max_length")
    with torch.no_grad():
        gen = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           input_features=torch.from_numpy(features), input_features_mask=torch.from_numpy(mask),
                           max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    want = gen[0, len(ids):].tolist()
    assert got == want and len(set(got)) > 1, (got, want)
