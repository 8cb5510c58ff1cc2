"""The checkpoint's generation_config.json as the defaults of `generate` and `chat`.

Hugging Face semantics: without `do_sample: true` decoding is greedy (temperature, top-k and
top-p in the file are then ignored, as transformers ignores them); with it, missing values take
transformers' defaults (temperature 1, top_k 50, top_p 1). The repetition penalty applies in
both modes. A missing file means greedy with no penalty.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import GemmaRuntimeError
from .sampling import SamplingConfig

FILE = "generation_config.json"
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


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
        raise GemmaRuntimeError(f"{path} cannot be read: {err}") from err
    fields = {}
    if raw.get("repetition_penalty") is not None:
        fields["repetition_penalty"] = float(raw["repetition_penalty"])
    if raw.get("do_sample"):
        for name, default in HF_SAMPLING_DEFAULTS.items():
            value = raw.get(name)
            fields[name] = default if value is None else value
        if raw.get("min_p") is not None:
            fields["min_p"] = float(raw["min_p"])
        if fields["top_k"] is None:
            fields["top_k"] = 0
    max_new = raw.get("max_new_tokens")
    try:
        return GenerationDefaults(SamplingConfig(**fields), int(max_new) if max_new else None)
    except (GemmaRuntimeError, TypeError, ValueError) as err:
        raise GemmaRuntimeError(f"{path} holds sampling settings this runtime cannot use: {err}") from err
