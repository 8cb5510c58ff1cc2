"""The export-friendly audio encoder (gemma_export/model/audio.py) against the eager
Gemma3nAudioEncoder + Gemma3nMultimodalEmbedder on a tiny random audio config, in torch and as ONNX."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gemma_export.model.audio import AudioEncoder, AudioSpec, audio_spec_from_config, load_audio_encoder

TEXT_HIDDEN = 48
AUDIO = dict(hidden_size=32, conf_num_hidden_layers=2, conf_num_attention_heads=4,
             sscp_conv_channel_size=[8, 4], vocab_size=128, vocab_offset=262_272)


class StateDictSource:
    """A TensorSource over a state dict, with the checkpoint's `model.` names."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name):
        return self.tensors[name]


@pytest.fixture(scope="module")
def eager():
    from transformers import Gemma3nAudioConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder, Gemma3nMultimodalEmbedder

    torch.manual_seed(0)
    cfg = Gemma3nAudioConfig(**AUDIO)
    tower = Gemma3nAudioEncoder(cfg).eval()
    embed = Gemma3nMultimodalEmbedder(cfg, SimpleNamespace(hidden_size=TEXT_HIDDEN)).eval()
    with torch.no_grad():  # random norms/scales too, so no parameter sits at an identity value
        for p in list(tower.parameters()) + list(embed.parameters()):
            p.add_(torch.randn_like(p) * 0.2)
    return cfg, tower, embed


def eager_soft_embeddings(cfg, tower, embed, features, mask, soft_tokens=188):
    """Gemma3nModel.forward's audio path: get_audio_features, then the padding to 188 tokens."""
    out = tower(features, ~mask, return_dict=True)
    feats = embed(inputs_embeds=out.last_hidden_state)
    pad = embed(input_ids=torch.tensor([[cfg.vocab_offset + cfg.vocab_size - 1]]))
    feats = torch.where(out.audio_mel_mask.unsqueeze(-1), pad, feats)
    extra = soft_tokens - feats.shape[1]
    return torch.cat([feats, pad.expand(1, extra, -1)], dim=1)


@pytest.fixture(scope="module")
def ours(eager):
    cfg, tower, embed = eager
    config = {"audio_config": cfg.to_dict(), "text_config": {"hidden_size": TEXT_HIDDEN, "vocab_size": 262_400}}
    spec = audio_spec_from_config(config)
    tensors = {f"model.audio_tower.{k}": v for k, v in tower.state_dict().items()}
    tensors.update({f"model.embed_audio.{k}": v for k, v in embed.state_dict().items()})
    return load_audio_encoder(spec, StateDictSource(tensors))


def padded_features(seconds: float, seed: int = 0):
    """Features of `seconds` of tone+noise through the runtime front end, padded to 30 s."""
    from gemma_runtime.audio_features import audio_features

    rng = np.random.default_rng(seed)
    n = int(seconds * 16_000)
    t = np.arange(n) / 16_000
    wave = (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    feats, mask = audio_features(wave, 16_000)
    return torch.from_numpy(feats), torch.from_numpy(mask)


def tol(ref: torch.Tensor) -> float:
    return 1e-4 * max(1.0, ref.abs().max().item())


def test_shapes_of_the_full_size_spec():
    spec = AudioSpec(text_hidden_size=2048)
    assert spec.sscp_dims() == [(1499, 64), (750, 32)]
    assert spec.encoder_steps == 750 and spec.output_steps == 188 and spec.context_size == 24
    with torch.device("meta"):
        model = AudioEncoder(spec)
    n = sum(p.numel() for p in model.parameters())
    assert 650e6 < n < 700e6  # the released tower + embedder, about 681M


def test_subsample_projection_matches(eager, ours):
    _, tower, _ = eager
    feats, _ = padded_features(3.0)
    with torch.no_grad():
        ref = tower.subsample_conv_projection(feats)
        got = ours.tower.subsample_conv_projection(feats)
    assert got.shape == ref.shape == (1, 750, 32)
    err = (got - ref).abs().max().item()
    print(f"sub-sample projection: max abs diff {err:.3g} (max |ref| {ref.abs().max().item():.3g})")
    assert err <= tol(ref)


@pytest.mark.parametrize("seconds", [1.3, 7.0, 30.0])
def test_encoder_matches_eager(eager, ours, seconds):
    cfg, tower, embed = eager
    feats, mask = padded_features(seconds)
    with torch.no_grad():
        ref = eager_soft_embeddings(cfg, tower, embed, feats, mask)
        got = ours(feats, mask)
    assert got.shape == ref.shape == (1, 188, TEXT_HIDDEN)
    err = (got - ref).abs().max().item()
    print(f"torch {seconds}s: max abs diff {err:.3g} (max |ref| {ref.abs().max().item():.3g})")
    assert err <= tol(ref)


def test_onnx_export_matches_eager(eager, ours, tmp_path):
    import onnxruntime as ort

    from gemma_export.audio_graph import export_audio

    cfg, tower, embed = eager
    start = time.perf_counter()
    model = export_audio(ours)
    export_s = time.perf_counter() - start
    path = tmp_path / "audio.onnx"
    import onnx

    onnx.save_model(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_features", "input_features_mask"]
    assert [tuple(i.shape) for i in session.get_inputs()] == [(1, 2997, 128), (1, 2997)]
    for seconds in (2.5, 30.0):
        feats, mask = padded_features(seconds, seed=1)
        with torch.no_grad():
            ref = eager_soft_embeddings(cfg, tower, embed, feats, mask)
        (got,) = session.run(None, {"input_features": feats.numpy(), "input_features_mask": mask.numpy()})
        assert got.shape == (1, 188, TEXT_HIDDEN)
        err = np.abs(got - ref.numpy()).max()
        print(f"onnx {seconds}s: max abs diff {err:.3g} (tol {tol(ref):.3g}); export {export_s:.1f}s")
        assert err <= tol(ref)


def test_weight_map_is_strict(eager):
    from gemma_export.model.audio import AudioConfigError

    cfg, tower, embed = eager
    config = {"audio_config": cfg.to_dict(), "text_config": {"hidden_size": TEXT_HIDDEN, "vocab_size": 262_400}}
    spec = audio_spec_from_config(config)
    tensors = {f"model.audio_tower.{k}": v for k, v in tower.state_dict().items()}
    tensors.update({f"model.embed_audio.{k}": v for k, v in embed.state_dict().items()})
    missing = dict(tensors)
    missing.pop("model.audio_tower.conformer.1.lconv1d.linear_end.weight")
    with pytest.raises(AudioConfigError, match="lacks audio weights"):
        load_audio_encoder(spec, StateDictSource(missing))
    extra = dict(tensors, **{"model.audio_tower.conformer.2.norm.weight": torch.ones(32)})
    with pytest.raises(AudioConfigError, match="no place"):
        load_audio_encoder(spec, StateDictSource(extra))
    wrong = dict(tensors, **{"model.embed_audio.embedding.weight": torch.ones(64, 32)})
    with pytest.raises(AudioConfigError, match="shape"):
        load_audio_encoder(spec, StateDictSource(wrong))


def test_config_errors():
    from gemma_export.model.audio import AudioConfigError

    with pytest.raises(AudioConfigError, match="audio_config"):
        audio_spec_from_config({"text_config": {"hidden_size": 8}})
    bad_vocab = {"audio_config": dict(AUDIO, vocab_offset=1000), "text_config": {"hidden_size": 8, "vocab_size": 262_400}}
    with pytest.raises(AudioConfigError, match="vocab"):
        audio_spec_from_config(bad_vocab)
