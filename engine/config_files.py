"""Config files: a TOML file given by path, or a preset shipped in configs/ given by name.

Engine presets (``nibble serve -c``, ``nibble compare --b``) and the SLO files of
``nibble bench serve`` (names starting with slo-) are read here, so the command line
(server/) and the load tests (loadtests/) read them the same way without
importing each other. What the keys mean is checked by their readers: EngineConfig.from_dict
(engine/config.py), SLO.load (loadtests/report.py). configs/models.toml is the alias table of
engine/hub.py, not a preset.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from engine.errors import ConfigError

PRESET_PACKAGE = "configs"
_NOT_PRESETS = ("models.toml",)


def presets(kind: str = "config") -> list[str]:
    """Names of the TOML presets in configs/: engine configs, or (kind "slo") the SLO files of
    `nibble bench serve`, whose names start with slo-."""
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir()
                  if p.name.endswith(".toml") and p.name not in _NOT_PRESETS
                  and p.name.startswith("slo-") == (kind == "slo"))


def is_config_name(name: str) -> bool:
    """A TOML file or the name of an engine preset in configs/."""
    if name.endswith(".toml"):
        return True
    return name in presets()


def read_config(name: str, kind: str = "config") -> dict:
    """A TOML file, or a preset of `kind` from configs/ by name (with or without .toml).
    A name that is neither, or text that is not TOML, raises ConfigError."""
    path = Path(name)
    if not path.exists():
        stem = name.removesuffix(".toml")
        if stem not in presets(kind):
            raise ConfigError(f"{kind} {name!r} is neither a file nor a preset; presets: "
                              f"{', '.join(presets(kind))}")
        path = resources.files(PRESET_PACKAGE) / f"{stem}.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML ({exc})") from None
