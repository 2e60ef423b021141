"""Incremental detokenization: never half a UTF-8 character, never a piece of a stop string."""

from __future__ import annotations

import pytest

from engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(default_source):
    from engine.tokenizer import load_tokenizer

    return load_tokenizer("gguf", default_source.path)


def stream(tokenizer, text: str, stop: list[str]) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        detok.add(token)
        deltas.append(detok.new_text(finished=False))
        if detok.stopped:
            break
    deltas.append(detok.new_text(finished=True))
    return deltas, detok


def test_multibyte_characters_are_never_split(tokenizer):
    text = "Grüße 🎉🦀 naïve 日本語 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # some characters span several byte-level tokens
    deltas, detok = stream(tokenizer, text, [])
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == text


def test_stop_string_across_tokens_is_cut_and_never_emitted(tokenizer):
    text = "The answer is forty-two, of course."
    deltas, detok = stream(tokenizer, text, ["two, of"])
    assert detok.stopped
    assert "".join(deltas) == "The answer is forty-"
    assert not any("two" in d for d in deltas)
