"""Streaming detokenization with a real byte-fallback tokenizer that splits UTF-8 characters."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models

from gemma_runtime.detokenize import REPLACEMENT, StreamDecoder

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz ▁!.,")


def byte_fallback_tokenizer() -> Tokenizer:
    """Gemma-like: BPE with byte fallback; letters are tokens, everything else is raw bytes."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in LETTERS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


@pytest.mark.parametrize("text", ["안녕하세요 세계", "hi 😀 there 👍🏽!", "é", "abc", "a가b😀c"])
def test_stream_pieces_join_to_the_full_decode(text):
    tok = byte_fallback_tokenizer()
    ids = tok.encode(text).ids
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    full = decode(ids)
    assert full == text  # the tokenizer round-trips, so the check below is meaningful
    assert len(ids) > len(text.encode("utf-8")) // 4  # characters really are split
    stream = StreamDecoder(decode)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == full
    assert not any(REPLACEMENT in p for p in pieces)
    # Text flows as characters complete: one non-empty piece per character.
    assert len([p for p in pieces if p]) == len(text)


def test_unfinished_character_is_held_back_then_flushed():
    tok = byte_fallback_tokenizer()
    decode = lambda ids: tok.decode(list(ids))  # noqa: E731
    ids = tok.encode("a가").ids  # a, then three bytes
    stream = StreamDecoder(decode)
    assert stream.push(ids[0]) == "a"
    assert stream.push(ids[1]) == "" and stream.push(ids[2]) == ""
    # Generation ends mid-character: finish gives what a full decode gives, nothing more.
    assert stream.finish() == decode(ids[:3])[1:]


def stream_all(decode, ids):
    stream = StreamDecoder(decode)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.finish())
    return pieces


def test_a_broken_byte_run_loses_no_later_text():
    """tokenizers decodes a byte run that is not valid UTF-8 as one U+FFFD per byte, also the
    bytes before the bad one; the stream has given those out already and keeps them, and every
    later piece still comes out."""
    tok = byte_fallback_tokenizer()
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    byte = lambda b: tok.token_to_id(f"<0x{b:02X}>")  # noqa: E731
    letters = lambda s: [tok.token_to_id(c) for c in s]  # noqa: E731
    ids = letters("kq") + [byte(0x16), byte(0xC3), byte(0xA9), byte(0xFF)] + letters("b") + \
        [byte(0xE4), byte(0xB8), byte(0xAD)] + letters("end")
    assert decode(ids) == "kq" + REPLACEMENT * 4 + "b中end"
    pieces = stream_all(decode, ids)
    assert "".join(pieces) == "kq\x16é" + REPLACEMENT + "b中end"
    assert pieces[-4:] == ["e", "n", "d", ""]  # back to one piece per token after the run


def test_random_byte_runs_keep_every_letter():
    rng = np.random.default_rng(0)
    tok = byte_fallback_tokenizer()
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    high_bytes = [tok.token_to_id(f"<0x{b:02X}>") for b in range(0x80, 0x100)]  # never ASCII letters
    letter_ids = [tok.token_to_id(c) for c in "abcdefghij"]
    broken = 0
    for _ in range(300):
        ids = [int(rng.choice(high_bytes if rng.random() < 0.5 else letter_ids)) for _ in range(rng.integers(1, 30))]
        full, joined = decode(ids), "".join(stream_all(decode, ids))
        ascii_of = lambda s: [c for c in s if c.isascii()]  # noqa: E731
        assert ascii_of(joined) == ascii_of(full), ids
        if REPLACEMENT not in full:
            assert joined == full
        broken += REPLACEMENT in full
    assert broken > 100  # most cases had a broken run
