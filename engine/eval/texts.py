"""What an A/B comparison reads: a corpus cut into chunks, and a prompt set.

The built-in corpus is CPython's `pydoc_data.topics` (the text behind `help()`), which ships with
every Python, so a comparison needs no download. The built-in prompts are short chat requests of
different kinds (facts, code, lists, arithmetic, prose).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ConfigError
from engine.tokenizer import apply_chat_template

BUILTIN = "builtin"
CORPUS_CHARS_PER_TOKEN = 8  # generous: read this many characters per needed token, no more

BUILTIN_PROMPTS = (
    "What is the capital of France, and what is it known for?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "List three uses of a hash table.",
    "Explain in two sentences why the sky is blue.",
    "What is 17 times 23? Show the steps.",
    "Write a short poem about the sea.",
    "Give me a recipe for pancakes.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "How do I reverse a string in JavaScript?",
    "Name four planets of the solar system and one fact about each.",
    "What does HTTP status code 404 mean?",
)


@dataclass(frozen=True)
class Prompt:
    """A prompt as token ids, with the text it came from (for reports)."""

    text: str
    ids: list[int]


def corpus_text(source: str) -> tuple[str, str]:
    """-> (text, name): the built-in corpus or a UTF-8 text file."""
    if source == BUILTIN:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics)), "builtin:pydoc_data.topics"
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the corpus {source!r}: {exc}") from None


# Calibration text for `nibble quantize --method gptq`: docstrings of these standard-library
# modules and their public members. Held apart from the comparison corpus (pydoc_data.topics,
# the language reference), so quality is measured on text the calibration never saw.
CALIBRATION_MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal",
                       "email.message", "fractions", "functools", "http.client", "itertools",
                       "json", "logging", "pathlib", "random", "re", "shutil", "sqlite3",
                       "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
                       "typing", "unittest", "urllib.parse", "zipfile")


def calibration_text(source: str) -> tuple[str, str]:
    """-> (text, name): the built-in calibration text or a UTF-8 text file."""
    if source != BUILTIN:
        return corpus_text(source)
    import importlib
    import inspect

    docs, seen = [], set()
    for name in CALIBRATION_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(getattr(module, a) for a in sorted(getattr(module, "__all__", [])))]:
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return "\n\n".join(docs), "builtin:stdlib docstrings"


def corpus_chunks(tokenizer, text: str, ctx: int, chunks: int) -> list[list[int]]:
    """The first `chunks` consecutive chunks of `ctx` tokens of `text`. At least 2 chunks
    are needed (intervals are bootstrapped over chunks) and `ctx` of at least 16."""
    if ctx < 16:
        raise ConfigError(f"ctx must be at least 16 tokens, got {ctx}")
    if chunks < 2:
        raise ConfigError(f"give at least 2 chunks (intervals are bootstrapped over chunks), got {chunks}")
    ids = tokenizer.encode(text[: ctx * chunks * CORPUS_CHARS_PER_TOKEN])
    have = len(ids) // ctx
    if have < chunks:
        raise ConfigError(f"the corpus has {len(ids)} tokens: {have} chunks of {ctx}, "
                          f"fewer than the {chunks} asked for")
    return [ids[i * ctx:(i + 1) * ctx] for i in range(chunks)]


def load_prompts(tokenizer, source: str | list[str], limit: int | None = None) -> list[Prompt]:
    """Built-in prompts (chat-templated), a list of texts (chat-templated), or a file: .jsonl
    with one {"messages": [...]} (chat) or {"prompt": "..."} (raw) or a JSON string per line;
    any other file holds one raw prompt per non-empty line."""
    if source == BUILTIN or isinstance(source, list):
        texts = list(BUILTIN_PROMPTS) if source == BUILTIN else source
        prompts = [_chat(tokenizer, [{"role": "user", "content": t}], t) for t in texts]
    else:
        prompts = _prompts_file(tokenizer, Path(source))
    if not prompts:
        raise ConfigError(f"no prompts in {source!r}")
    return prompts[:limit] if limit else prompts


def _chat(tokenizer, messages: list[dict], text: str) -> Prompt:
    return Prompt(text, apply_chat_template(tokenizer, messages))


def _prompts_file(tokenizer, path: Path) -> list[Prompt]:
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the prompts {str(path)!r}: {exc}") from None
    if path.suffix != ".jsonl":
        return [Prompt(line, tokenizer.encode(line)) for line in lines]
    out = []
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: not JSON ({exc})") from None
        if isinstance(item, str):
            out.append(Prompt(item, tokenizer.encode(item)))
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            out.append(_chat(tokenizer, item["messages"], str(item["messages"][-1].get("content", ""))))
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            out.append(Prompt(item["prompt"], tokenizer.encode(item["prompt"])))
        else:
            raise ConfigError(f'{path}:{n}: expected a string, {{"prompt": "..."}} or {{"messages": [...]}}')
    return out
