"""The checkpoint's generation_config.json as the defaults of `generate` and `chat`.

Hugging Face semantics: without `do_sample: true` decoding is greedy (temperature, top-k and
top-p in the file are then ignored, as transformers ignores them); with it, missing values take
transformers' defaults (temperature 1, top_k 50, top_p 1), and a null one is off (`"top_k": null`
is no top-k, as transformers reads it). The repetition penalty applies in both modes. A missing
file means greedy with no penalty.

Values must be JSON numbers (do_sample a boolean): a string such as "1.2" or "x" is a
GenerationConfigError naming the file and the field, not a guess at what it meant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import GemmaRuntimeError, GenerationConfigError
from .sampling import SamplingConfig

FILE = "generation_config.json"
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
_OFF = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}  # a field present but null
_OPTIONAL = ("min_p", "repetition_penalty", "max_new_tokens")
_INTEGERS = ("top_k", "max_new_tokens")


@dataclass(frozen=True)
class GenerationDefaults:
    sampling: SamplingConfig
    max_new_tokens: int | None  # from the file's max_new_tokens, if it has one


def read_generation_defaults(folder: Path) -> GenerationDefaults:
    path = Path(folder) / FILE
    if not path.is_file():
        return GenerationDefaults(SamplingConfig(), None)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise GenerationConfigError(f"{path} cannot be read: {err}") from err
    # every numeric field is checked, also those greedy decoding ignores: a typo is caught early
    values = {name: _field(raw, name, path) for name in (*HF_SAMPLING_DEFAULTS, *_OPTIONAL)}
    do_sample = raw.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise GenerationConfigError(f"{path}: do_sample must be true or false, got {do_sample!r}")
    fields = {}
    if values["repetition_penalty"] is not None:
        fields["repetition_penalty"] = values["repetition_penalty"]
    if do_sample:
        for name, default in HF_SAMPLING_DEFAULTS.items():
            value = values[name]
            fields[name] = value if value is not None else _OFF[name] if name in raw else default
        if values["min_p"] is not None:
            fields["min_p"] = values["min_p"]
    max_new = values["max_new_tokens"]
    if max_new is not None and max_new < 0:
        raise GenerationConfigError(f"{path}: max_new_tokens must be >= 0, got {max_new}")
    try:
        return GenerationDefaults(SamplingConfig(**fields), max_new or None)
    except GemmaRuntimeError as err:
        raise GenerationConfigError(f"{path} holds sampling settings this runtime cannot use: {err}") from err


def _field(raw: dict, name: str, path: Path) -> int | float | None:
    """raw[name] as a number (None when absent or null); anything else is an error naming it."""
    value = raw.get(name)
    if value is None:
        return None
    integer = name in _INTEGERS
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise GenerationConfigError(
            f"{path}: {name} must be {'an integer' if integer else 'a number'}, got {value!r}; "
            f"fix the value or remove the field"
        )
    return value if integer else float(value)
