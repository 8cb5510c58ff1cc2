"""Chat template rendering, stop strings, and KV reuse across calls on tiny exports (ids level)."""

from __future__ import annotations

import json

import pytest

from checkpoints import prompt_ids
from gemma_runtime import ChatTemplateError, InvalidArgumentError, Model, UnsupportedContentError
from gemma_runtime.chat_template import GEMMA_TEMPLATE, ChatTemplate, read_template
from gemma_runtime.stop_strings import StopStrings, check_stop_strings

SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}


def gemma(messages, **kw):
    return ChatTemplate(GEMMA_TEMPLATE, "test", SPECIAL).render(messages, **kw)


# ---- template ----------------------------------------------------------------------------------


def test_gemma_standard_template_multi_turn_with_system():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": "Hello!\n"},
        {"role": "user", "content": [{"type": "text", "text": "안녕?"}]},
    ]
    assert gemma(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n안녕?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert gemma(messages[1:2], add_generation_prompt=False) == "<bos><start_of_turn>user\nHi<end_of_turn>\n"


@pytest.mark.parametrize("messages, error, match", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], ChatTemplateError, "must alternate"),
    ([{"role": "user", "content": [{"type": "image", "image": "x.png"}]}], UnsupportedContentError, "image part.*not supported"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}], UnsupportedContentError, "audio"),
    ([{"role": "robot", "content": "a"}], InvalidArgumentError, "role 'robot'"),
    ([{"content": "a"}], InvalidArgumentError, "'role' and 'content'"),
    ([], InvalidArgumentError, "non-empty list"),
    ("hello", InvalidArgumentError, "non-empty list"),
])
def test_bad_conversations(messages, error, match):
    with pytest.raises(error, match=match):
        gemma(messages)


def test_template_sources(tmp_path):
    assert read_template(tmp_path)[0] == GEMMA_TEMPLATE  # none in the checkpoint
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}))
    source, origin = read_template(tmp_path)
    assert "tokenizer_config" in origin
    assert ChatTemplate(source, origin, SPECIAL).render([{"role": "user", "content": "x"}]) == "<bos>x"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}")
    source, origin = read_template(tmp_path)
    assert origin == "chat_template.jinja"
    assert ChatTemplate(source, origin, SPECIAL).render([{"role": "user", "content": "x"}]) == "[user]"
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}", "bad", SPECIAL)


def test_template_is_sandboxed():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(evil, "evil", SPECIAL).render([{"role": "user", "content": "x"}])


# ---- stop strings ------------------------------------------------------------------------------


def run_stops(stops, pieces):
    s = StopStrings(stops)
    out = [s.push(p) for p in pieces]
    out.append(s.finish())
    return out, s.stopped


def test_stop_string_split_over_pieces_is_cut_and_never_shown():
    out, stopped = run_stops(["END"], ["ab", "cE", "N", "Dxyz"])
    assert "".join(out) == "abc" and stopped
    assert out[1] == "c"  # "E" is held back: it may start "END"


def test_stop_string_false_start_is_released():
    out, stopped = run_stops(["END", "\n\n"], ["aE", "Nb", "\n", "c"])
    assert "".join(out) == "aENb\nc" and not stopped


def test_earliest_stop_wins_and_bad_stops():
    out, _ = run_stops(["b", "abc"], ["xabcd"])
    assert "".join(out) == "x"  # "abc" starts before "b"
    assert check_stop_strings("x") == ("x",) and check_stop_strings(None) == ()
    for bad in ([""], [3], ""):
        with pytest.raises(InvalidArgumentError, match="stop must be"):
            check_stop_strings(bad)


# ---- KV reuse on tiny real-architecture exports ----------------------------------------------


def fresh(model, ids, n):
    model.reset()
    return model.generate_ids(ids, max_new_tokens=n)


@pytest.mark.parametrize("family,graph_passes", [("gemma3_sw8", "none"), ("gemma3_sw8", None), ("gemma", None)])
def test_reuse_equals_fresh_prefill(tiny, family, graph_passes):
    """Two-block exports (--graph-passes none) keep sliding layers in rings; the cpu target's
    GroupQueryAttention exports keep them in the op's windowed buffers (9 rows for the window of
    8, shifted down every second token once full): neither rolls back across a shift. Gemma has
    no sliding layers: its caches are linear and roll back freely."""
    model = Model.load(tiny.export(family, graph_passes=graph_passes))
    assert model.manifest.kv_layout == {"none": "past_and_new_blocks", None: "shared_buffer_windowed" if family != "gemma"
                                        else "shared_buffer"}[graph_passes]
    rings = family != "gemma"
    p1 = prompt_ids(1)  # 21 tokens; sliding window 8 for gemma3_sw8: the ring has wrapped
    cases = []
    gen = model.generate_ids(p1, max_new_tokens=6)
    # 1. the new prompt extends the cached ids (prompt + answer[:-1]): prefill only the rest
    ext = p1 + gen + [7, 8, 9, 10, 11]
    cases.append((p1, 6, ext, len(p1) + 5))
    # 2. it diverges inside the answer (a re-tokenized or cut answer): the rings were overwritten
    #    (the windowed buffers shifted at 22, 24 and 26 tokens),
    #    so the state saved at the end of the prompt's prefill is restored (global-only: rolls back)
    div = p1 + gen[:2] + [12, 13, 14]
    cases.append((p1, 6, div, len(p1) if rings else len(p1) + 2))
    # 3. it diverges before the end of the last prompt, far behind the ring: no reuse possible
    early = p1[:10] + [15, 16, 17]
    cases.append((p1, 6, early, 0 if rings else 10))
    # 4. short: 4 + 2 positions, the ring of 8 has not wrapped, so it can roll back too
    short = p1[:4]
    cases.append((short, 3, short[:3] + [18, 19], 3))
    for first, n_first, second, reused in cases:
        want = fresh(model, second, 8)
        model.reset()
        model.generate_ids(first, max_new_tokens=n_first)
        got = model.generate_ids(second, max_new_tokens=8, reuse_cache=True)
        assert model.last_stats.reused_tokens == reused, (first, second)
        assert got == want, (first, second)


def test_parity_driver_invalidates_the_remembered_ids(tiny):
    import numpy as np

    model = Model.load(tiny.export("gemma3_sw8"))
    p = prompt_ids(2)
    model.generate_ids(p, max_new_tokens=3)
    model._cache.reset()
    model._step(np.asarray(p[:5], dtype=np.int64), 0, model.manifest.prefill_chunk)  # a caller's own steps
    want = fresh(model, p + [5], 4)
    model._step(np.asarray(p[:5], dtype=np.int64), 0, model.manifest.prefill_chunk)
    assert model.generate_ids(p + [5], max_new_tokens=4, reuse_cache=True) == want
    assert model.last_stats.reused_tokens == 0
