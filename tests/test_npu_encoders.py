"""NPU target (qnn-htp) encoder graphs: the vision tower (MobileNetV5, full size) and the audio tower
(tiny conformer) of the tiny multimodal checkpoint as static QDQ graphs that run entirely on the
QNN HTP (PyPI's onnxruntime-qnn; on x86-64 an emulator) with onnxruntime's CPU fallback off.

References: the fp32 CPU-target encoders of the same checkpoint (conftest's `multimodal` export),
on a JPEG and a WAV written here, as tests/test_multimodal.py makes its media (or photo.jpg and
speech.wav from $GEMMA_TEST_MEDIA), and the
same QDQ graphs on onnxruntime's CPU provider, which the HTP must agree with. The export calibrates
on its built-in synthetic media (npu_encoders.calibration_media), never on the files compared here.

The HTP emulator runs 0.3-0.7 GMAC/s and the vision tower is 436 GMAC a forward (1235 s measured):
here the HTP runs the audio graph (every node placed); the vision graph is checked for static shapes
and the target's op list, and bench/npu_encoders.py measures its placement (the HTP's 2-6 minute
graph preparation) and the vision tower's HTP-vs-CPU agreement, whole (cosine >= 0.99983) and block
by block. Cost on two cores beyond the shared `multimodal` fixture: ~2 minutes (encoders built
~85 s, the vision QDQ/fp32 runs ~25 s), more while other jobs share the cores. The whole NPU export
with its static Gemma 3n decoder graphs and NpuModel (test_npu_export_with_encoders, ~3 minutes more) runs with
GEMMA_TEST_NPU_MULTIMODAL=1 (it passed).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gemma_runtime.errors import MediaError
from gemma_runtime.manifest import read_manifest
from multimodal_checkpoint import AUDIO, BOA, BOS, EOA

pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn is not installed")

QNN, CPU = "QNNExecutionProvider", "CPUExecutionProvider"
# a folder with photo.jpg and speech.wav to compare on; by default the fixture writes its own, so a
# fresh clone on any machine tests the same media (the floors below hold on both)
MEDIA = Path(os.environ.get("GEMMA_TEST_MEDIA", "/nonexistent-media-folder"))
NPU_CONTEXT, NPU_CHUNK = 512, 32  # room for one audio run (188 ids) and a short prompt
SHORT_SECONDS = 5.0  # a second audio graph, shorter than the 30 s default


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _compare(want: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """(mean cosine over rows, min cosine, max |diff| / max |want|)."""
    cos = _cosine_rows(want, got)
    return float(cos.mean()), float(cos.min()), float(np.abs(want - got).max() / np.abs(want).max())


def _session(path: Path, provider: str = CPU) -> ort.InferenceSession:
    """The runtime's encoder session (qnn: CPU fallback off)."""
    from gemma_runtime.session_cache import open_encoder_session

    return open_encoder_session(path, provider, 1)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[Path, Path]:
    """(JPEG, WAV) to compare on: real ones where present, else written here."""
    if (MEDIA / "photo.jpg").is_file() and (MEDIA / "speech.wav").is_file():
        return MEDIA / "photo.jpg", MEDIA / "speech.wav"
    import soundfile
    from PIL import Image

    root = tmp_path_factory.mktemp("npu-media")
    rng = np.random.default_rng(11)
    y, x = np.mgrid[0:480, 0:640]
    rgb = np.stack([x * 255 / 639, 128 + 90 * np.sin(y / 19.0), 255 - y * 255 / 479], -1) + rng.normal(0, 14, (480, 640, 3))
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(root / "photo.jpg", quality=88)
    t = np.arange(5 * 16_000) / 16_000
    wave = 0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.2 * np.sin(3 * t))) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    soundfile.write(root / "speech.wav", (wave + 0.03 * rng.standard_normal(t.size)).astype(np.float32), 16_000)
    return root / "photo.jpg", root / "speech.wav"


@pytest.fixture(scope="module")
def encoders(multimodal, tmp_path_factory) -> tuple[Path, object]:
    """(folder, manifest): the qnn-htp vision and audio graphs of the tiny multimodal checkpoint, as
    write_npu_export writes them (npu_encoders.write_npu_encoders, calibrated on its built-in media),
    in a folder beside the checkpoint's preprocessor config, and the CPU export's manifest with
    those graphs in place of its own (what MediaEncoders reads of an NPU export). The whole NPU export
    (static Gemma 3n decoder graphs too) is test_npu_export_with_encoders, opt-in."""
    from gemma_export.checkpoint import open_checkpoint
    from gemma_export.npu_encoders import write_npu_encoders
    from gemma_export.progress import Progress
    from gemma_runtime.integrity import sha256_file

    cpu = multimodal[1]
    ckpt = open_checkpoint(str(cpu.parent / "checkpoint"))
    folder = tmp_path_factory.mktemp("npu-encoders") / "out"
    folder.mkdir()
    graphs, _, record = write_npu_encoders(ckpt.config, ckpt.tensors, dict(ckpt.aux_files), folder, Progress(enabled=False))
    shutil.copyfile(cpu / "preprocessor_config.json", folder / "preprocessor_config.json")
    m = read_manifest(cpu)
    files = {f: sha256_file(folder / f) for spec in graphs.values() for f in (spec.file, spec.data_file)}
    m = dataclasses.replace(m, target="qnn-htp", providers=("qnn",), graphs={**m.graphs, **graphs},
                            files={**m.files, **files}, provenance={**m.provenance, "encoders": record})
    return folder, m


@pytest.fixture(scope="module")
def short_audio(multimodal, tmp_path_factory) -> tuple[Path, Path]:
    """(folder with a 5 s QDQ audio graph, folder with its float graph), by the exporter's builder."""
    from gemma_export.checkpoint import open_checkpoint
    from gemma_export.npu_encoders import write_npu_encoders
    from gemma_export.progress import Progress

    ckpt = open_checkpoint(str(multimodal[1].parent / "checkpoint"))
    root = tmp_path_factory.mktemp("npu-short-audio")
    write_npu_encoders(ckpt.config, ckpt.tensors, dict(ckpt.aux_files), root / "qdq", Progress(enabled=False),
                       audio_seconds=SHORT_SECONDS, keep_float=root / "float", kinds=("audio",))
    return root / "qdq", root / "float"


def _media_encoders(encoders, provider: str):
    from gemma_runtime.multimodal import MediaEncoders

    return MediaEncoders(encoders[0], encoders[1], provider, 1)


def _audio_feeds(wav: Path, frames: int, dtype=np.float32, seconds: float | None = None) -> dict[str, np.ndarray]:
    """The runtime's features of `wav` (first `seconds` of it), padded to 30 s, first `frames`."""
    from gemma_runtime.audio_features import audio_features, read_audio_file

    wave, rate = read_audio_file(str(wav))
    if seconds is not None:
        wave = wave[: int(seconds * rate)]
    features, mask = audio_features(wave, rate, padding="max_length")
    return {"input_features": features[:, :frames], "input_features_mask": mask[:, :frames].astype(dtype)}


def _pixels(folder: Path, jpeg: Path) -> dict[str, np.ndarray]:
    from gemma_runtime.image_processing import ImageProcessor

    return {"pixel_values": ImageProcessor.from_folder(folder)(jpeg).astype(np.float32)}


# ---- the export ---------------------------------------------------------------------------------


def test_static_qdq_encoder_graphs_with_their_record(encoders, multimodal):
    folder, m = encoders
    cpu = read_manifest(multimodal[1])
    for kind in ("vision", "audio"):
        spec = m.graphs[kind]
        assert spec.data_file and (folder / spec.file).is_file() and (folder / spec.data_file).is_file()
        assert [t.shape for t in spec.inputs] == [t.shape for t in cpu.graphs[kind].inputs]  # 768 x 768; 2997 frames
        assert spec.outputs == cpu.graphs[kind].outputs
    assert [t.dtype for t in m.graphs["audio"].inputs] == ["float32", "float32"]  # the mask is a number here
    record = m.provenance["encoders"]
    assert record["audio"]["frames"] == 2997 and record["audio"]["seconds"] == 30.0
    for kind in ("vision", "audio"):
        assert record[kind]["format"] == "qdq" and record[kind]["activations"] == "uint16"
        assert "synthetic" in record[kind]["calibration"] and record[kind]["on_host"]


def test_encoder_graphs_fit_the_target_and_every_audio_node_is_on_the_htp(encoders):
    """gemma-export check's report: static shapes and only ops of the target's list in both encoder
    graphs; every node of the audio graph on the QNN provider (and the runtime's own audio session,
    CPU fallback off). The vision graph's placement is the HTP's 2-6 minute graph preparation (134 s
    of a 35-minute CI run on 2026-12-02): bench/npu_encoders.py --parts vision measures it."""
    from gemma_export.check import check_graph
    from gemma_export.targets import load_target

    folder, m = encoders
    target = load_target("qnn-htp")
    for kind, providers in (("vision", ()), ("audio", ("qnn",))):
        spec = m.graphs[kind]
        report = check_graph(folder, kind, spec.file, spec.data_file, target, providers)
        print(f"\n{kind}: {report.nodes} nodes, {report.bytes / 2**20:.1f} MiB")
        assert report.static and not report.unsupported and not report.problems(target), report.problems(target)
        if providers:
            (qnn,) = report.placements  # onnxruntime's node count, after it folds the weights' DequantizeLinear
            assert set(qnn.nodes) == {QNN} and not qnn.off_provider
    session = _session(folder / m.graphs["audio"].file, QNN)
    assert session.get_session_options().get_session_config_entry("session.disable_cpu_ep_fallback") == "1"


def test_qdq_encoders_stay_close_to_the_fp32_cpu_encoders(encoders, multimodal, media):
    """CPU provider, a real JPEG and WAV: the QDQ graphs against the fp32 CPU-target graphs."""
    (folder, m), cpu, (jpeg, wav) = encoders, multimodal[1], media
    ref = read_manifest(cpu)
    pixels = _pixels(cpu, jpeg)
    want = _session(cpu / ref.graphs["vision"].file).run(None, pixels)[0]
    got = _media_encoders(encoders, CPU).encode_image(jpeg)  # the runtime's path: processor, session
    vision = _compare(want[0], got)
    want = _session(cpu / ref.graphs["audio"].file).run(None, _audio_feeds(wav, 2997, bool))[0]
    got = _session(folder / m.graphs["audio"].file).run(None, _audio_feeds(wav, 2997))[0]
    audio = _compare(want, got)
    print(f"\nQDQ vs fp32, cosine mean/min, max|diff|/max|ref|: vision {vision}, audio {audio}")
    # measured (photo.jpg / speech.wav): vision 0.9977 / 0.9973 / 0.078, audio 0.99996 / 0.9994 / 0.033
    assert vision[1] > 0.99 and vision[2] < 0.15
    assert audio[1] > 0.995 and audio[2] < 0.1


def test_the_htp_audio_run_agrees_with_the_cpu_run(encoders, media):
    """The runtime's MediaEncoders on the export's provider (qnn, CPU fallback off) and on
    --provider cpu: the same QDQ audio graph, the same rows."""
    htp, cpu = _media_encoders(encoders, QNN), _media_encoders(encoders, CPU)
    got = htp.encode_audio(media[1])
    assert htp._sessions["audio"].get_providers()[0] == QNN
    agreement = _compare(cpu.encode_audio(media[1]), got)
    print(f"\nHTP vs CPU (audio), cosine mean/min, max|diff|/max|ref|: {agreement}")
    assert agreement[1] > 0.999 and agreement[2] < 0.05  # measured 0.99999 / 0.99986 / 0.014


def test_an_encoder_graph_the_htp_cannot_take_is_a_provider_error(multimodal, media):
    """The CPU target's float audio graph (CumSum, bool mask) on qnn: one ProviderError at first use,
    naming the graph and the way out, not a silent CPU run."""
    from gemma_runtime import ProviderError
    from gemma_runtime.multimodal import MediaEncoders

    encoders = MediaEncoders(multimodal[1], read_manifest(multimodal[1]), QNN, 1)
    with pytest.raises(ProviderError, match=r"cannot run all of audio\.onnx.*--provider cpu"):
        encoders.encode_audio(media[1])


# ---- the EP-context cache ----------------------------------------------------------------------


def _context_ops(entry: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(entry / "model_ctx.onnx"), load_external_data=False).graph.node}


def test_encoder_ep_contexts_are_compiled_once_and_reused(encoders, media, tmp_path, monkeypatch):
    """graph_cache on qnn: the audio encoder's first use compiles its EP context into the cache
    folder, a later MediaEncoders opens that (every node an EPContext: the HTP's graph preparation
    skipped), and both give the rows of a plain (uncached) qnn session, bit for bit. On the cpu
    provider graph_cache keeps no encoder cache. (The vision graph the same way, compile and reuse
    only, is opt-in below: its HTP preparation takes minutes and an HTP run 20.)"""
    from gemma_runtime.integrity import CACHE_ENV
    from gemma_runtime.multimodal import MediaEncoders

    folder, m = encoders
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    first = MediaEncoders(folder, m, QNN, 1, graph_cache=True)
    compiled = first.encode_audio(media[1])
    assert first.sources == {"audio": "EP context compiled and saved"}
    (entry,) = (cache / "contexts").iterdir()  # one graph, no staging folder left
    assert _context_ops(entry) == {"EPContext"}  # the whole audio tower is on the HTP
    second = MediaEncoders(folder, m, QNN, 1, graph_cache=True)
    cached = second.encode_audio(media[1])
    assert second.sources == {"audio": "cached EP context"}
    assert second._sessions["audio"].get_providers()[0] == QNN
    assert [i.name for i in second._sessions["audio"].get_inputs()] == [t.name for t in m.graphs["audio"].inputs]
    plain = MediaEncoders(folder, m, QNN, 1)
    want = plain.encode_audio(media[1])
    assert plain.sources == {"audio": "graph"}
    np.testing.assert_array_equal(cached, want)
    np.testing.assert_array_equal(compiled, want)
    on_cpu = MediaEncoders(folder, m, CPU, 1, graph_cache=True)
    on_cpu.encode_audio(media[1])
    assert on_cpu.sources == {"audio": "graph"} and sorted(p.name for p in cache.iterdir()) == ["contexts"]


@pytest.mark.skipif(os.environ.get("GEMMA_TEST_NPU_MULTIMODAL") != "1",
                    reason="the vision tower's HTP graph preparation takes minutes: GEMMA_TEST_NPU_MULTIMODAL=1")
def test_the_vision_ep_context_is_compiled_once_and_reused(encoders, tmp_path, monkeypatch):
    """The vision graph's context, as the audio one's: compiled on first use, opened from the cache
    after. Its rows are not compared here: an HTP run of the tower takes ~20 minutes (module doc)."""
    from gemma_runtime.integrity import CACHE_ENV
    from gemma_runtime.multimodal import MediaEncoders

    folder, m = encoders
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    first = MediaEncoders(folder, m, QNN, 1, graph_cache=True)
    first._session("image")
    assert first.sources == {"vision": "EP context compiled and saved"}
    (entry,) = (cache / "contexts").iterdir()
    assert _context_ops(entry) == {"EPContext"}
    second = MediaEncoders(folder, m, QNN, 1, graph_cache=True)
    session = second._session("image")
    assert second.sources == {"vision": "cached EP context"} and session.get_providers()[0] == QNN
    spec = m.graphs["vision"]
    assert [(i.name, tuple(i.shape)) for i in session.get_inputs()] == [(t.name, t.shape) for t in spec.inputs]
    assert [(o.name, tuple(o.shape)) for o in session.get_outputs()] == [(t.name, t.shape) for t in spec.outputs]


# ---- the audio graph's length --------------------------------------------------------------------


def test_the_float_npu_audio_graph_equals_the_cpu_graph(short_audio, multimodal, media):
    """The restructured tower (averaging MatMul, additive mask, strided context, RMSNormalization) at
    5 s equals the CPU graph at 30 s on the rows of a 4 s clip, and both fill the rest with padding."""
    cpu = multimodal[1]
    want = _session(cpu / "audio.onnx").run(None, _audio_feeds(media[1], 2997, bool, seconds=4.0))[0]
    frames = _frames(short_audio[1] / "audio.onnx")
    got = _session(short_audio[1] / "audio.onnx").run(None, _audio_feeds(media[1], frames, seconds=4.0))[0]
    assert got.shape == want.shape == (1, 188, 64)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


def _frames(path: Path) -> int:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1].dim_value


def test_the_short_audio_graph_runs_on_the_htp(short_audio, media):
    """The 5 s QDQ audio graph (the length bench/npu_encoders.py runs the full-size tower at on the
    emulator) placed whole on the HTP, CPU fallback off, with the CPU provider's rows."""
    path = short_audio[0] / "audio.onnx"
    feeds = _audio_feeds(media[1], _frames(path), seconds=4.0)
    session = _session(path, QNN)
    assert session.get_providers()[0] == QNN
    agreement = _compare(_session(path).run(None, feeds)[0], session.run(None, feeds)[0])
    print(f"\nHTP vs CPU (5 s audio graph), cosine mean/min, max|diff|/max|ref|: {agreement}")
    assert agreement[1] > 0.995 and agreement[2] < 0.1


def test_a_short_audio_graph_pads_short_clips_and_refuses_long_ones(short_audio, encoders, media):
    """MediaEncoders on an export whose audio graph takes 5 s (497 frames): a 4 s clip is padded to
    it (rows past the clip: the padding embedding), a 6 s clip is refused with the limit."""
    from gemma_export.npu_encoders import _spec, audio_frames
    from gemma_runtime.audio_features import read_audio_file
    from gemma_runtime.multimodal import MediaEncoders

    folder, m = encoders
    frames = audio_frames(SHORT_SECONDS)
    short = _spec("audio.onnx", short_audio[0])
    assert short.inputs[0].shape == (1, frames, 128) and short.outputs[0].shape == (1, 188, 64)
    encoders = MediaEncoders(short_audio[0], dataclasses.replace(m, graphs={**m.graphs, "audio": short}), CPU, 1)
    wave, rate = read_audio_file(str(media[1]))
    wave = np.tile(wave, -(-6 * rate // wave.shape[0]))
    rows = encoders.encode_audio((wave[: 4 * rate], rate))
    assert rows.shape == (188, 64)
    # 400 real frames -> 25 rows of the clip; the graph's 32 steps, then 156 appended padding rows
    np.testing.assert_allclose(rows[25:], np.broadcast_to(rows[-1], rows[25:].shape), atol=2e-3)
    assert np.abs(rows[:25] - rows[-1]).max() > 0.1
    with pytest.raises(MediaError, match=rf"at most {frames * 160 / 16000:.2f} s"):
        encoders.encode_audio((wave[: 6 * rate], rate))


# ---- the whole export (opt-in) -----------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("GEMMA_TEST_NPU_MULTIMODAL") != "1",
                    reason="the tiny Gemma 3n's static decoder graphs take minutes more: GEMMA_TEST_NPU_MULTIMODAL=1")
def test_npu_export_with_encoders(multimodal, media, tmp_path, monkeypatch):
    """gemma-export --target qnn-htp of the multimodal checkpoint: prefill, decode, vision, audio in
    one manifest; NpuModel fills an audio run on the HTP (CPU fallback off) with the rows of the CPU
    provider, and an image run with provider='cpu'. With graph_cache the audio encoder's EP context
    is kept beside the decoder graphs' and a second load opens all three from the cache."""
    from gemma_runtime.integrity import CACHE_ENV
    from gemma_export.npu_export import write_npu_export
    from gemma_export.plan import ExportRequest, make_plan
    from gemma_export.progress import Progress
    from gemma_runtime.npu_decoder import NpuModel, load_model
    from multimodal_checkpoint import BOI, EOI, IMAGE

    cpu_export = multimodal[1]
    plan = make_plan(ExportRequest(checkpoint=str(cpu_export.parent / "checkpoint"), target="qnn-htp",
                                   max_context=NPU_CONTEXT, prefill_chunk=NPU_CHUNK))
    out = tmp_path / "out"
    write_npu_export(plan, out, Progress(enabled=False))
    m, cpu = read_manifest(out), read_manifest(cpu_export)
    assert set(m.graphs) == {"prefill", "decode", "vision", "audio"} and m.tokens == cpu.tokens
    assert m.provenance["encoders"]["audio"]["frames"] == 2997
    rows = lambda folder: np.fromfile(folder / "embed_tokens.bin", dtype=np.float32).reshape(m.vocab_size, -1)
    np.testing.assert_array_equal(rows(out)[256:], rows(cpu_export)[256:])  # the hard-token rows

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    htp = load_model(out, provider="qnn", threads=1, graph_cache=True)
    assert isinstance(htp, NpuModel)
    ids = [BOS, 30, BOA, *[AUDIO] * 188, EOA, 40, 41]
    assert 1 <= len(htp.generate_ids(ids, max_new_tokens=3, audio=[media[1]])) <= 3
    assert htp.loaded_encoders == ("audio",) and htp._media._sessions["audio"].get_providers()[0] == QNN
    assert htp.encoder_sources == {"audio": "EP context compiled and saved"}
    assert len(list((tmp_path / "cache" / "contexts").iterdir())) == 3  # prefill, decode, audio
    again = load_model(out, provider="qnn", threads=1, graph_cache=True)
    np.testing.assert_array_equal(again._media.encode_audio(media[1]), htp._media.encode_audio(media[1]))
    assert again.session_source == "cached EP context" and again.encoder_sources == {"audio": "cached EP context"}
    on_cpu = load_model(out, provider="cpu", threads=1)
    assert _compare(on_cpu._media.encode_audio(media[1]), htp._media.encode_audio(media[1]))[1] > 0.999
    ids = [BOS, 30, BOI, *[IMAGE] * 256, EOI, 40]
    assert 1 <= len(on_cpu.generate_ids(ids, max_new_tokens=2, images=[media[0]])) <= 2
