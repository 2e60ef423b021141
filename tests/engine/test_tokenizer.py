"""engine.tokenizer's description of a tokenizer (served as GET /tokenizer_info): plain JSON
values whatever the tokenizer holds, and the chat template that apply_chat_template renders."""

from __future__ import annotations

import json

import pytest

from engine.errors import CheckpointError
from engine.tokenizer import apply_chat_template, chat_template, tokenizer_info


class _Token(str):
    """Stands in for tokenizers' AddedToken: a str subclass that json would still take, but
    a client should get the plain text."""


class _Stub:
    def __init__(self, template, **special):
        self.chat_template = template
        for name in ("eos", "bos", "pad", "unk"):
            text, tid = special.get(name, (None, None))
            setattr(self, f"{name}_token", text)
            setattr(self, f"{name}_token_id", tid)

    def __len__(self):
        return 7

    def apply_chat_template(self, messages, chat_template=None, **kwargs):
        return chat_template + "|" + messages[0]["content"]

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


@pytest.mark.parametrize(("template", "served"), [
    (None, None),
    ("", None),
    ("  \n", None),
    ("{{ messages }}", "{{ messages }}"),
    ({"default": "{{ a }}", "tool_use": "{{ b }}"}, "{{ a }}"),
    ({"tool_use": "{{ b }}"}, None),  # named templates but no default: nothing applies
])
def test_chat_template_is_the_one_applied(template, served):
    tok = _Stub(template)
    assert chat_template(tok) == served
    msgs = [{"role": "user", "content": "hi"}]
    if served is None:
        with pytest.raises(CheckpointError, match="no chat template"):
            apply_chat_template(tok, msgs)
    else:
        assert apply_chat_template(tok, msgs) == [ord(c) for c in served + "|hi"]


def test_tokenizer_info_is_plain_json_with_nulls_for_what_is_missing():
    tok = _Stub({"tool_use": "x"}, eos=(_Token("</s>"), 2), unk=("<unk>", None),
                pad=("<pad>", True))
    info = tokenizer_info(tok)
    assert info == {
        "eos_token": "</s>", "eos_token_id": 2, "bos_token": None, "bos_token_id": None,
        "pad_token": "<pad>", "pad_token_id": None, "unk_token": "<unk>", "unk_token_id": None,
        "chat_template": None, "vocab_size": 7, "tokenizer_class": "_Stub"}
    assert type(info["eos_token"]) is str
    assert json.loads(json.dumps(info)) == info
