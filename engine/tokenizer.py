"""Tokenizer and chat template from transformers (it reads GGUF tokenizers too).

Converting a GGUF tokenizer takes seconds (every token and merge is parsed), so the result is
saved once in the nibble cache, keyed by the file's path, size and modification time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from engine.errors import CheckpointError


def load_tokenizer(kind: str, path: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # GGUF conversion warnings are noise to a user
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        if kind != "gguf":
            return AutoTokenizer.from_pretrained(str(path))
        cached = _cache_dir(path)
        if (cached / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(cached))
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        _save(tok, cached)
        return tok
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {exc}") from None


def _cache_dir(gguf: Path) -> Path:
    from engine.hub import default_cache_dir

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return default_cache_dir() / "tokenizers" / key


def _save(tok, target: Path) -> None:
    """Saves into a temporary sibling and renames, so a reader never sees half a tokenizer."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tok-"))
    try:
        tok.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; theirs is whole


def eos_ids(tokenizer, config_eos: tuple[int, ...]) -> set[int]:
    ids = set(config_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def chat_template(tokenizer) -> str | None:
    """The Jinja template `apply_chat_template` renders, or None when the model has none.

    A tokenizer may carry several named templates (a dict); without a name, transformers uses
    the one called "default", so that is the one meant here.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    template = chat_template(tokenizer)
    if template is None:
        raise CheckpointError("this model has no chat template; use generate with a plain prompt")
    text = tokenizer.apply_chat_template(messages, chat_template=template,
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


SPECIAL_TOKENS = ("eos", "bos", "pad", "unk")


def tokenizer_info(tokenizer) -> dict:
    """What a client needs to tokenize and template like the server does, as plain JSON values:
    each special token's text and id (None where the tokenizer has none), the chat template,
    the number of token ids (added tokens included) and the tokenizer's class."""
    info: dict = {}
    for name in SPECIAL_TOKENS:
        text = getattr(tokenizer, f"{name}_token", None)
        tid = getattr(tokenizer, f"{name}_token_id", None) if text is not None else None
        info[f"{name}_token"] = None if text is None else str(text)
        info[f"{name}_token_id"] = tid if isinstance(tid, int) and not isinstance(tid, bool) else None
    info["chat_template"] = chat_template(tokenizer)
    info["vocab_size"] = len(tokenizer)
    info["tokenizer_class"] = type(tokenizer).__name__
    return info
