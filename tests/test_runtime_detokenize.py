"""Streaming detokenization with a real byte-fallback tokenizer that splits UTF-8 characters."""

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
