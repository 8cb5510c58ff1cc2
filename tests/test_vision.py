"""The vision graph: strict weight map, shapes, and parity with transformers' eager image path.

The reference is transformers' own code: `Gemma3nModel.get_image_features` run on a
TimmWrapperModel (timm's mobilenetv5_300m_enc, as AutoModel builds it from Gemma3nVisionConfig)
and a Gemma3nMultimodalEmbedder (real vision hidden size 2048, tiny text hidden size), with
seeded random weights. A whole Gemma3nForConditionalGeneration is not built: its tower has no
smaller variant, and the text and audio parts play no role in get_image_features. The same
tensors, under the checkpoint's names, go through our strict map into the export model.
The full-size tower costs about 20 s per forward and 35 s to export on two cores: the graph is the
session's multimodal export's (conftest.py; its checkpoint holds these same tensors), and both
forwards happen once per module.
"""

from __future__ import annotations

import types

import numpy as np

import pytest
import torch

from gemma_export.model.vision import VisionConfigError, VisionEncoder, VisionSpec, vision_spec_from_config
from gemma_export.vision_weights import (
    EMBEDDER_PREFIX,
    TOWER_PREFIX,
    RandomVisionTensors,
    check_vision_names,
    hard_token_rows,
    load_vision,
    vision_weight_map,
)
from gemma_export.weights import WeightMapError

TEXT_HIDDEN = 64


def _config() -> dict:
    """A Gemma3nForConditionalGeneration config.json (default vision config, tiny text hidden size)."""
    from transformers import Gemma3nConfig

    config = Gemma3nConfig(text_config={"hidden_size": TEXT_HIDDEN, "num_hidden_layers": 2}).to_dict()
    config["architectures"] = ["Gemma3nForConditionalGeneration"]
    return config


class _Subset:
    """A TensorSource over another one with names dropped, renamed or replaced."""

    def __init__(self, base, drop=(), extra=None):
        self.base, self.drop, self.extra = base, set(drop), dict(extra or {})

    def names(self):
        return [n for n in self.base.names() if n not in self.drop] + list(self.extra)

    def shape(self, name):
        return tuple(self.get(name).shape)

    def get(self, name):
        return self.extra[name] if name in self.extra else self.base.get(name)


@pytest.fixture(scope="module")
def spec() -> VisionSpec:
    return vision_spec_from_config(_config())


@pytest.fixture(scope="module")
def tensors(spec):
    return RandomVisionTensors(spec, seed=3, vocab_size=128)  # the multimodal checkpoint's (tests/multimodal_checkpoint.py)


def _eager_image_features(tensors, pixel_values: torch.Tensor) -> torch.Tensor:
    """transformers' get_image_features on its own modules, loaded strictly from `tensors`."""
    from transformers import AutoModel, Gemma3nConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nModel, Gemma3nMultimodalEmbedder

    config = Gemma3nConfig(**{k: v for k, v in _config().items() if k != "architectures"})
    tower = AutoModel.from_config(config.vision_config).eval()
    embedder = Gemma3nMultimodalEmbedder(config.vision_config, config.text_config).eval()
    for module, prefix in ((tower, "model.vision_tower."), (embedder, EMBEDDER_PREFIX)):
        state = {n[len(prefix):]: tensors.get(n) for n in tensors.names() if n.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    owner = types.SimpleNamespace(config=config, vision_tower=tower, embed_vision=embedder)
    with torch.no_grad():
        out = Gemma3nModel.get_image_features(owner, pixel_values)
    return out.pooler_output


@pytest.fixture(scope="module")
def pixel_values(tmp_path_factory):
    """A natural-looking image through the runtime's image processor (Gemma 3n config)."""
    from PIL import Image

    from gemma_runtime.image_processing import ImageProcessorConfig, preprocess

    y, x = np.mgrid[0:500, 0:640]
    rng = np.random.default_rng(1)
    rgb = np.stack([(x * 255 / 639), (y * 255 / 499), 128 + 100 * np.sin(x / 23.0) * np.cos(y / 31.0)], -1)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("vision") / "image.jpg"
    Image.fromarray(rgb).save(path)
    config = ImageProcessorConfig.from_dict({"size": {"height": 768, "width": 768}, "resample": 2, "do_normalize": False})
    return torch.from_numpy(preprocess(path, config))


@pytest.fixture(scope="module")
def exported(spec, multimodal):
    """vision.onnx of the session's multimodal export (conftest.py): its checkpoint holds these same
    tensors (tests/multimodal_checkpoint.py: RandomVisionTensors of this spec, seed 3), so the
    full-size tower is exported once per session, by gemma-export itself."""
    import multimodal_checkpoint

    assert vision_spec_from_config(multimodal_checkpoint.gemma3n_config().to_dict()) == spec
    return multimodal[1] / "vision.onnx"


def test_parity_with_eager_get_image_features(exported, tensors, pixel_values):
    import onnxruntime as ort

    ref = _eager_image_features(tensors, pixel_values).numpy()
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"pixel_values": pixel_values.numpy()})
    assert out.shape == ref.shape == (1, 256, TEXT_HIDDEN)
    diff = float(np.abs(out - ref).max())
    bound = 1e-4 * max(1.0, float(np.abs(ref).max()))
    print(f"vision parity: max|diff| {diff:.3g}, max|ref| {np.abs(ref).max():.3g}, bound {bound:.3g}")
    assert diff <= bound


def test_graph_is_static_with_external_data(exported):
    import onnx

    model = onnx.load(str(exported), load_external_data=False)
    dims = lambda v: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(v.name, dims(v)) for v in model.graph.input] == [("pixel_values", [1, 3, 768, 768])]
    assert [(v.name, dims(v)) for v in model.graph.output] == [("soft_embeddings", [1, 256, TEXT_HIDDEN])]
    assert (exported.parent / "vision.data").stat().st_size > 1e9  # 294M float32 parameters
    assert exported.stat().st_size < 50e6


def test_shapes_on_meta(spec):
    with torch.device("meta"):
        encoder = VisionEncoder(spec)
        out = encoder(torch.zeros(spec.input_shape))
    assert tuple(out.shape) == spec.output_shape == (1, 256, TEXT_HIDDEN)


def test_map_covers_every_tensor(spec, tensors):
    with torch.device("meta"):
        encoder = VisionEncoder(spec)
    wmap = vision_weight_map(encoder)
    assert set(wmap.params.values()) == set(encoder.state_dict())
    assert set(wmap.params) | set(wmap.ignored) == set(tensors.names())
    assert len([n for n in wmap.params if n.startswith(TOWER_PREFIX)]) == 548
    check_vision_names(wmap, tensors.names() + ["model.language_model.norm.weight", "model.audio_tower.x"])


def test_unmapped_vision_weight_is_named(spec, tensors):
    extra = {TOWER_PREFIX + "blocks.9.9.surprise.weight": torch.zeros(3)}
    with pytest.raises(WeightMapError, match=r"no destination: model\.vision_tower\.timm_model\.blocks\.9\.9\.surprise\.weight"):
        load_vision(spec, _Subset(tensors, extra=extra))


def test_missing_vision_weight_is_named(spec, tensors):
    gone = EMBEDDER_PREFIX + "soft_embedding_norm.weight"
    with pytest.raises(WeightMapError, match=r"missing from the checkpoint: model\.embed_vision\.soft_embedding_norm\.weight"):
        load_vision(spec, _Subset(tensors, drop=[gone]))


def test_shape_mismatch_is_named(spec, tensors):
    name = TOWER_PREFIX + "conv_stem.conv.weight"
    with pytest.raises(WeightMapError, match=r"conv_stem\.conv\.weight has shape \(2, 3, 3, 3\)"):
        load_vision(spec, _Subset(tensors, extra={name: torch.zeros(2, 3, 3, 3)}))


def test_stand_in_towers_are_rejected(spec):
    """The text tests' stand-in tensors are not a vision tower: the map says so, naming them."""
    from tests.checkpoints import _TOWER_TENSORS

    names = [n for n in _TOWER_TENSORS]
    with torch.device("meta"):
        wmap = vision_weight_map(VisionEncoder(spec))
    with pytest.raises(WeightMapError, match="missing from the checkpoint"):
        check_vision_names(wmap, names)


def test_unsupported_tower_is_a_clear_error():
    config = _config()
    config["vision_config"]["architecture"] = "resnet50"
    with pytest.raises(VisionConfigError, match="resnet50"):
        vision_spec_from_config(config)


def test_hard_token_rows_match_eager_embedder(spec, tensors):
    from transformers import Gemma3nConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nMultimodalEmbedder

    config = Gemma3nConfig(**{k: v for k, v in _config().items() if k != "architectures"})
    embedder = Gemma3nMultimodalEmbedder(config.vision_config, config.text_config).eval()
    state = {n[len(EMBEDDER_PREFIX):]: tensors.get(n) for n in tensors.names() if n.startswith(EMBEDDER_PREFIX)}
    embedder.load_state_dict(state, strict=True)
    ids = torch.arange(config.vision_config.vocab_offset, config.vision_config.vocab_offset + config.vision_config.vocab_size)
    with torch.no_grad():
        ref = embedder(input_ids=ids[None])[0]
    rows = hard_token_rows(spec, tensors)
    assert rows.shape == (128, TEXT_HIDDEN)
    torch.testing.assert_close(rows, ref, rtol=1e-5, atol=1e-5)
