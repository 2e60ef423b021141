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


def apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError("this model has no chat template; use generate with a plain prompt")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)
