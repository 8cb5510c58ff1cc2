"""Images and audio for Gemma 3n exports: the encoder sessions (opened on first use), the
placeholder runs of a prompt, and the processor's expansion of the chat template's soft tokens.

A prompt holds one run of `image` placeholder ids per image (256 for Gemma 3n) and one run of
`audio` ids per clip (188), as Gemma3nProcessor writes them:

    "\\n\\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\\n\\n"
    "\\n\\n<start_of_audio>" + "<audio_soft_token>" * 188 + "<end_of_audio>\\n\\n"

The runtime runs the encoders and puts their soft embeddings at those positions of inputs_embeds
(every other id, boi/eoi/boa/eoa included, is one row of embed_tokens.bin). Runs are matched with
the given images / clips in order, each kind separately; a count that differs is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import GemmaRuntimeError, InvalidArgumentError, MediaError, ProviderError, UnsupportedContentError
from .manifest import Manifest

KINDS = ("image", "audio")
_GRAPH = {"image": "vision", "audio": "audio"}
_HOP, _RATE = 160, 16_000  # the audio front end's frame step and sample rate (audio_features.py)


def as_list(items, kind: str) -> list:
    if items is None:
        return []
    if isinstance(items, (str, Path)) or (kind == "audio" and isinstance(items, tuple) and len(items) == 2
                                           and not isinstance(items[0], (str, Path))):
        return [items]  # one path, or one (array, sample_rate) clip
    try:
        return list(items)
    except TypeError:
        return [items]  # one PIL image


def placeholder_runs(ids: np.ndarray, token: int | None) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of `token` in ids."""
    if token is None:
        return []
    hit = np.concatenate([[False], ids == token, [False]])
    edges = np.flatnonzero(hit[1:] != hit[:-1])
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


class MediaEncoders:
    """The vision and audio sessions of an export, each created when first needed, on the model's
    provider: for an NPU export (gemma-export --target qnn-htp: static QDQ encoder graphs) the qnn
    provider with onnxruntime's CPU fallback off, so a graph the HTP cannot take whole is a
    ProviderError on first use; or --provider cpu, the same QDQ graphs on the CPU.

    graph_cache (Model.load's): on qnn each encoder's compiled EP context is kept in the runtime's
    cache, as the decoder graphs' are (session_cache.open_cached_encoder_session), so a later first
    use skips the HTP's graph preparation; on other providers the encoders are not cached.
    `sources`: graph name -> how its session was made ("graph", "cached EP context", ...)."""

    def __init__(self, folder: Path, manifest: Manifest, provider: str, threads: int | None,
                 graph_cache: bool = False):
        self.folder, self.manifest, self.provider, self.threads = folder, manifest, provider, threads
        self.graph_cache = graph_cache
        self._sessions: dict[str, object] = {}
        self.sources: dict[str, str] = {}
        self._image_processor = None

    def has(self, kind: str) -> bool:
        return _GRAPH[kind] in self.manifest.graphs and getattr(self.manifest.tokens, kind) is not None

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    def soft_tokens(self, kind: str) -> int:
        return int(self.manifest.graphs[_GRAPH[kind]].outputs[0].shape[1])

    def _session(self, kind: str):
        name = _GRAPH[kind]
        if name not in self._sessions:
            from .session_cache import open_cached_encoder_session, open_encoder_session

            graph = self.manifest.graphs[name]
            path = self.folder / graph.file
            try:
                if self.graph_cache:
                    files = self.manifest.files
                    self._sessions[name], self.sources[name] = open_cached_encoder_session(
                        path, self.provider, self.threads, files[graph.file], files.get(graph.data_file))
                else:
                    self._sessions[name], self.sources[name] = open_encoder_session(
                        path, self.provider, self.threads), "graph"
            except ProviderError:
                raise
            except GemmaRuntimeError as err:
                if self.provider == "CPUExecutionProvider":
                    raise
                # an accelerator with onnxruntime's CPU fallback off (qnn) takes the whole graph or fails here
                raise ProviderError(
                    f"execution provider {self.provider} cannot run all of {graph.file} with onnxruntime's CPU "
                    f"fallback off: {str(err.__cause__ or err).strip().splitlines()[0]}; pass --provider cpu "
                    f"(provider='cpu') to run it on the CPU") from err
        return self._sessions[name]

    def encode_image(self, image) -> np.ndarray:
        """[soft_tokens, H] float32 for one image (path or PIL image)."""
        if self._image_processor is None:
            from .image_processing import ImageProcessor

            self._image_processor = ImageProcessor.from_folder(self.folder)
        pixels = self._image_processor(image)
        graph = self.manifest.graphs["vision"]
        (out,) = self._session("image").run(None, {graph.inputs[0].name: pixels.astype(np.float32)})
        return out[0]

    def encode_audio(self, clip) -> np.ndarray:
        """[soft_tokens, H] float32 for one clip (path or (array, sample_rate)), padded to 30 s.

        A graph of F < 2997 frames (NPU exports pick a shorter fixed clip) gets the first F frames
        of the padded features, which are those of the clip padded to F frames (the front end is
        frame-local, padding is zeros); a clip with real samples past frame F is refused. The mask
        goes in the graph's dtype: bool (CPU graphs) or float32 1/0 (NPU graphs)."""
        from .audio_features import audio_features

        if isinstance(clip, tuple) and len(clip) == 2:
            features, mask = audio_features(clip[0], clip[1], padding="max_length")
        else:
            features, mask = audio_features(clip, padding="max_length")
        graph = self.manifest.graphs["audio"]
        frames = graph.inputs[0].shape[1]
        if features.shape[1] < frames:
            raise MediaError(f"the audio features have {features.shape[1]} frames, the audio graph takes {frames}")
        if features.shape[1] > frames:
            if mask[:, frames:].any():
                raise MediaError(
                    f"the clip lasts about {mask.sum() * _HOP / _RATE:.2f} s; this export's audio graph takes "
                    f"{frames} frames, clips of at most {frames * _HOP / _RATE:.2f} s: cut the clip, or use an "
                    f"export whose audio graph is longer")
            features, mask = features[:, :frames], mask[:, :frames]
        feeds = {graph.inputs[0].name: features.astype(np.float32),
                 graph.inputs[1].name: mask.astype(np.dtype(graph.inputs[1].dtype))}
        (out,) = self._session("audio").run(None, feeds)
        return out[0]

    def soft_rows(self, ids: np.ndarray, images: list, audio: list) -> tuple[np.ndarray, np.ndarray] | None:
        """(positions [k] int64, rows [k, H] float32) to put into inputs_embeds, or None when the
        prompt has no placeholders and no media were given. Checks counts before any encoder runs."""
        plans = []
        for kind, items in (("image", images), ("audio", audio)):
            token = getattr(self.manifest.tokens, kind)
            if not self.has(kind):
                if items:
                    raise UnsupportedContentError(
                        f"{kind}s are not supported by this export: it has no {_GRAPH[kind]} graph "
                        f"(a text model, or exported with --text-only)")
                continue
            runs = placeholder_runs(ids, token)
            n = self.soft_tokens(kind)
            if len(runs) != len(items):
                raise MediaError(
                    f"the prompt has {len(runs)} {kind} placeholder run(s) (id {token}) but {len(items)} "
                    f"{kind}(s) were given: each {kind} needs one run of {n} placeholder ids, in order (Model.chat "
                    f"and gemma-run --{kind} write them; in a raw generate() prompt, write the {kind} soft token "
                    f"where each {kind} goes)")
            bad = [length for _, length in runs if length != n]
            if bad:
                raise MediaError(f"{kind} placeholder runs must hold {n} ids each (as the processor writes them); "
                                 f"found run(s) of {', '.join(map(str, bad))}")
            plans += [(kind, start, item) for (start, _), item in zip(runs, items)]
        if not plans:
            return None
        positions, rows = [], []
        for kind, start, item in plans:
            out = self.encode_image(item) if kind == "image" else self.encode_audio(item)
            positions.append(np.arange(start, start + out.shape[0], dtype=np.int64))
            rows.append(out.astype(np.float32, copy=False))
        return np.concatenate(positions), np.concatenate(rows)


def collect_media(messages: Sequence[Mapping]) -> tuple[list, list]:
    """The images and audio clips of a conversation's parts, in order."""
    images, audio = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, (str, bytes)) or not isinstance(content, Sequence):
            continue
        for part in content:
            if isinstance(part, Mapping) and part.get("type") in KINDS:
                kind = part["type"]
                if kind not in part:
                    raise InvalidArgumentError(f"an {kind} part must be {{'type': '{kind}', '{kind}': ...}}, got {part!r}")
                (images if kind == "image" else audio).append(part[kind])
    return images, audio


def expand_placeholders(text: str, names: Mapping[str, str | None], counts: Mapping[str, int]) -> str:
    """Gemma3nProcessor's expansion: each image/audio soft token of the rendered template becomes
    its full placeholder sequence. names: image, audio, boi, eoi, boa, eoa -> token strings."""
    for kind, begin, end in (("image", "boi", "eoi"), ("audio", "boa", "eoa")):
        token = names.get(kind)
        if not token or token not in text:
            continue
        if not names.get(begin) or not names.get(end):
            raise MediaError(f"the export's manifest lacks the {begin}/{end} ids needed to expand {kind} placeholders")
        full = f"\n\n{names[begin]}{token * counts[kind]}{names[end]}\n\n"
        text = text.replace(token, full)
    return text
