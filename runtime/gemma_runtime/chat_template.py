"""Render a conversation into the prompt text with the checkpoint's chat template (jinja2).

The template comes from chat_template.jinja, else tokenizer_config.json's "chat_template";
a checkpoint with neither (the Gemma 3 270M base model) gets GEMMA_TEMPLATE, Gemma's standard
template: turns `<start_of_turn>{user|model}\\n...<end_of_turn>\\n`, a system message prepended
to the first user turn, BOS at the start. Rendering runs in jinja2's sandbox with the globals
Hugging Face templates use (raise_exception, strftime_now, bos_token, eos_token, ...).

Messages: {"role": "system"|"user"|"assistant", "content": str | [parts]}, parts
{"type": "text", "text": ...}, {"type": "image", "image": ...}, {"type": "audio", "audio": ...}
(image/audio only on exports with those encoders; the template writes one soft token per part,
which Model expands into the processor's placeholder run, multimodal.py).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import ChatTemplateError, InvalidArgumentError, UnsupportedContentError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
ROLES = ("system", "user", "assistant")

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ image_token or '<start_of_image>' }}"
    "{%- elif item['type'] == 'audio' -%}{{ audio_token }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def read_template(folder: Path) -> tuple[str, str]:
    """(template source, where it came from)."""
    folder = Path(folder)
    path = folder / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8"), TEMPLATE_FILE
    config = folder / TOKENIZER_CONFIG
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError) as err:
            raise ChatTemplateError(f"{config} cannot be read: {err}") from err
        if isinstance(template, list):  # the older named-templates form
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template, f"{TOKENIZER_CONFIG} chat_template"
    return GEMMA_TEMPLATE, "Gemma's standard template (the checkpoint has none)"


def check_messages(messages: Sequence[Mapping], media: Sequence[str] = ()) -> list[dict]:
    """Validate the message format; image/audio parts only where `media` names their kind
    (the export has that encoder), else a clear error."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise InvalidArgumentError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise InvalidArgumentError(f"message {i} has role {message['role']!r}; known roles: {', '.join(ROLES)}")
        content = message["content"]
        if isinstance(content, str):
            out.append(dict(message))
            continue
        if not isinstance(content, Sequence) or isinstance(content, bytes):
            raise InvalidArgumentError(f"message {i}: content must be a string or a list of parts")
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind in ("image", "audio"):
                if kind in media:
                    if kind not in part:
                        raise InvalidArgumentError(f"message {i}: an {kind} part must be {{'type': '{kind}', '{kind}': ...}}")
                    continue
                raise UnsupportedContentError(
                    f"message {i} has an {kind} part: {kind}s are not supported by this export "
                    f"(it has no {'vision' if kind == 'image' else 'audio'} graph: a text model, or exported with --text-only)"
                )
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgumentError(f"message {i}: a part must be {{'type': 'text', 'text': str}}, got {part!r}")
        out.append({**message, "content": [dict(p) for p in content]})
    return out


class ChatTemplate:
    def __init__(self, source: str, origin: str, special_tokens: Mapping[str, str | None]):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.origin = origin
        self._special = dict(special_tokens)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        try:
            self._template = env.from_string(source)
        except TemplateError as err:
            raise ChatTemplateError(f"the chat template ({origin}) does not parse: {err}") from err

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
               media: Sequence[str] = ()) -> str:
        from jinja2 import TemplateError

        messages = check_messages(messages, media)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._special)
        except ChatTemplateError:
            raise
        except TemplateError as err:
            raise ChatTemplateError(f"the chat template ({self.origin}) failed on these messages: {err}") from err
        except (TypeError, KeyError, IndexError, AttributeError) as err:
            raise ChatTemplateError(
                f"the chat template ({self.origin}) failed on these messages: {type(err).__name__}: {err}"
            ) from err


def _raise(message: str):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")
