"""Checkpoint folders and hub ids: tiny random checkpoints saved by transformers."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from gemma_export import hub
from gemma_export.checkpoint import Checkpoint, open_checkpoint
from gemma_export.errors import CheckpointError, ExportError


def _gemma3(seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=300,
        sliding_window=16,
        max_position_embeddings=256,
        query_pre_attn_scalar=32,  # = head_dim, as in every real Gemma 3 but 27B
    )
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms are initialized to 0 / 1: make every tensor distinct
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def _gemma(seed: int = 1):
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    cfg = GemmaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=300,
        max_position_embeddings=256,
    )
    model = GemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def _saved_state(model) -> dict[str, torch.Tensor]:
    """The state dict as save_pretrained writes it (tied lm_head dropped)."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def _assert_same(ck: Checkpoint, expected: dict[str, torch.Tensor]):
    assert sorted(ck.tensors.names()) == sorted(expected)
    for name, ref in expected.items():
        assert ck.tensors.shape(name) == tuple(ref.shape), name
        got = ck.tensors.get(name)
        assert got.dtype == torch.float32 and got.is_contiguous(), name
        assert torch.equal(got, ref.to(torch.float32)), name


@pytest.fixture(scope="module")
def gemma3_folder(tmp_path_factory):
    model = _gemma3()
    folder = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(folder)
    return folder, _saved_state(model)


@pytest.mark.parametrize("make", [_gemma3, _gemma], ids=["gemma3", "gemma"])
def test_single_file_equals_state_dict(tmp_path, make):
    model = make()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ck = open_checkpoint(tmp_path)
    _assert_same(ck, _saved_state(model))
    assert ck.config == json.loads((tmp_path / "config.json").read_text())
    assert ck.source == str(tmp_path)
    for name in ("config.json", "model.safetensors"):
        assert ck.file_hashes[name] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    # save_pretrained writes generation_config.json for causal LMs; nothing else is there
    assert set(ck.aux_files) == {"generation_config.json"}
    assert ck.aux_files["generation_config.json"] == tmp_path / "generation_config.json"


def test_sharded_equals_state_dict(tmp_path):
    model = _gemma3(seed=2)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    ck = open_checkpoint(str(tmp_path))
    _assert_same(ck, _saved_state(model))
    assert set(ck.file_hashes) == {"config.json", "model.safetensors.index.json", *(s.name for s in shards)}


def test_bf16_upcast(tmp_path):
    model = _gemma3(seed=3).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ck = open_checkpoint(tmp_path)
    assert ck.tensors.dtype("model.embed_tokens.weight") == "BF16"
    _assert_same(ck, {k: v.float() for k, v in _saved_state(model).items()})


def test_aux_files_found(gemma3_folder, tmp_path):
    src, _ = gemma3_folder
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "special_tokens_map.json", "tokenizer.model", "README.md"):
        (tmp_path / name).write_text("{}")
    ck = open_checkpoint(tmp_path)
    assert set(ck.aux_files) == {
        "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
        "preprocessor_config.json", "special_tokens_map.json", "tokenizer.model",
    }


# ---------------------------------------------------------------------------------------------
# bad input


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_errors_are_export_errors():
    assert issubclass(CheckpointError, ExportError) and issubclass(ExportError, Exception)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder") as e:
        open_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_missing_local_path_that_looks_like_a_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        open_checkpoint("./models/gemma")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        open_checkpoint("a/b/c")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        open_checkpoint("owner/model.gguf")


def test_folder_without_config(gemma3_folder, tmp_path):
    folder = _copy(gemma3_folder[0], tmp_path / "ck")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(folder)


def test_unreadable_config(gemma3_folder, tmp_path):
    folder = _copy(gemma3_folder[0], tmp_path / "ck")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json.*not valid JSON"):
        open_checkpoint(folder)


def test_corrupt_safetensors(gemma3_folder, tmp_path):
    folder = _copy(gemma3_folder[0], tmp_path / "ck")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(folder)


def test_corrupt_safetensors_header_json(gemma3_folder, tmp_path):
    folder = _copy(gemma3_folder[0], tmp_path / "ck")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:12] = b"\xff{[("  # breaks the JSON header, length unchanged
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*JSON"):
        open_checkpoint(folder)


def test_truncated_safetensors(gemma3_folder, tmp_path):
    folder = _copy(gemma3_folder[0], tmp_path / "ck")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        open_checkpoint(folder)
    (folder / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        open_checkpoint(folder)


def test_truncated_shard(tmp_path):
    _gemma3().save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=shard.name):
        open_checkpoint(tmp_path)


def test_missing_shard(tmp_path):
    _gemma3().save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        open_checkpoint(tmp_path)


def test_index_names_tensor_not_in_shard(tmp_path):
    _gemma3().save_pretrained(tmp_path, max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[0]
    data["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        open_checkpoint(tmp_path)


def test_no_safetensors(gemma3_folder, tmp_path):
    folder = _copy(gemma3_folder[0], tmp_path / "ck")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors"):
        open_checkpoint(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickles are not read"):
        open_checkpoint(folder)


# ---------------------------------------------------------------------------------------------
# hub ids


def test_looks_like_hub_id():
    assert hub.looks_like_hub_id("google/gemma-3n-E2B-it")
    assert hub.looks_like_hub_id("unsloth/gemma-3-270m-it")
    for text in ("gemma", "a/b/c", "./x/y", "/abs/path", "owner/model.gguf", "../x", "x/..", "~/m"):
        assert not hub.looks_like_hub_id(text), text


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _fails_fast(repo_id: str) -> CheckpointError:
    t = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(repo_id)
    assert time.monotonic() - t < 10
    return e.value


def test_hub_offline_env(empty_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = str(_fails_fast("google/gemma-3n-E2B-it"))
    assert "cannot be reached" in msg and "--checkpoint" in msg and "HF_HUB_OFFLINE" in msg


def test_hub_unreachable_endpoint(empty_hf_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    msg = str(_fails_fast("google/gemma-3n-E2B-it"))
    assert "cannot be reached" in msg and "--checkpoint" in msg


def test_hub_no_network(empty_hf_cache):
    if hub.hub_reachable():
        pytest.skip("this machine can reach the hub")
    msg = str(_fails_fast("google/gemma-3n-E2B-it"))
    assert "cannot be reached" in msg and "--checkpoint" in msg


def _http_error(cls, status: int):
    try:  # huggingface_hub 2.x builds its errors on httpx2's Response, 1.x on httpx's
        import httpx2 as httpx
    except ImportError:
        import httpx

    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x/y"))
    return cls(f"{status} error", response=response)


@pytest.mark.parametrize(
    "error, expect",
    [
        ("GatedRepoError", "accept the model's licence.*HF_TOKEN"),
        ("RepositoryNotFoundError", "no such model on the Hugging Face hub"),
        ("RevisionNotFoundError", "no revision"),
        ("HfHubHTTPError403", "accept the model's licence.*HF_TOKEN"),
    ],
)
def test_hub_refusals(monkeypatch, error, expect):
    import huggingface_hub
    from huggingface_hub import errors

    if error == "HfHubHTTPError403":
        exc = _http_error(errors.HfHubHTTPError, 403)
    else:
        exc = _http_error(getattr(errors, error), 401 if error != "RevisionNotFoundError" else 404)

    def fake_download(*args, **kwargs):
        raise exc

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=0: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(CheckpointError, match=expect):
        open_checkpoint("google/gemma-3n-E2B-it", revision="main")


def test_hub_download_opens_folder(gemma3_folder, monkeypatch):
    import huggingface_hub

    calls = {}

    def fake_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(gemma3_folder[0])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=0: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    ck = open_checkpoint("someone/tiny-gemma3", revision="abc")
    assert ck.source == "someone/tiny-gemma3"
    assert calls["repo_id"] == "someone/tiny-gemma3" and calls["revision"] == "abc"
    assert "*.safetensors" in calls["allow_patterns"] and "*.json" in calls["allow_patterns"]
    _assert_same(ck, gemma3_folder[1])
