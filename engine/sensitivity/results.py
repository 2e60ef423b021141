"""A sensitivity scan's record: per module its bytes at 16 bits and, per scanned format, the
KLD and bytes of quantizing it alone (scan.py measures it); JSON, so that a plan can be made
later without scanning again, and the terminal table."""

from __future__ import annotations

import json
from dataclasses import dataclass

from engine.errors import ConfigError

SCHEMA = "nibble.scan/1"
WIDE = "bf16"  # how a module left unquantized is served, and the width bytes are saved against


@dataclass(frozen=True)
class Option:
    """One module at one format."""

    format: str
    kld: float  # mean KL(reference || this module quantized), nats per scored token
    nbytes: int  # the module's weight bytes at this format, as `nibble inspect` counts them
    kld_ci95: tuple[float, float] | None = None  # bootstrap over chunks (2 chunks at least)


@dataclass(frozen=True)
class ModuleScan:
    name: str
    wide_bytes: int
    options: tuple[Option, ...]  # one per scanned format, in the scan's order

    def saved(self, option: Option) -> int:
        """Bytes saved against 16 bits (negative for a tied lm_head)."""
        return self.wide_bytes - option.nbytes


@dataclass(frozen=True)
class Scan:
    model: str  # as the reference was loaded; what a plan's config names
    formats: tuple[str, ...]
    modules: tuple[ModuleScan, ...]
    fixed_bytes: int  # weight bytes outside the scanned modules, as a plan's model holds them
    chunks: int
    ctx: int
    scored_tokens: int
    seconds: float
    calibration: str = ""

    def to_json(self) -> str:
        data = {"schema": SCHEMA, "model": self.model, "formats": list(self.formats),
                "wide": WIDE, "fixed_bytes": self.fixed_bytes, "chunks": self.chunks,
                "ctx": self.ctx, "scored_tokens": self.scored_tokens,
                "seconds": self.seconds, "calibration": self.calibration,
                "modules": [{"name": m.name, "wide_bytes": m.wide_bytes,
                             "options": [{"format": o.format, "kld": o.kld, "bytes": o.nbytes,
                                          "kld_ci95": list(o.kld_ci95) if o.kld_ci95 else None}
                                         for o in m.options]}
                            for m in self.modules]}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Scan:
        """A scan written by to_json; anything else is a ConfigError."""
        hint = "write one with `nibble plan --scan --out scan.json`"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not a nibble scan: not JSON ({exc}); {hint}") from None
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != SCHEMA:
            raise ConfigError(f"not a nibble scan: schema {schema!r}, expected {SCHEMA!r}; {hint}")
        try:
            modules = tuple(ModuleScan(m["name"], int(m["wide_bytes"]), tuple(
                Option(o["format"], float(o["kld"]), int(o["bytes"]),
                       tuple(o["kld_ci95"]) if o["kld_ci95"] else None) for o in m["options"]))
                for m in data["modules"])
            return cls(data["model"], tuple(data["formats"]), modules, int(data["fixed_bytes"]),
                       int(data["chunks"]), int(data["ctx"]), int(data["scored_tokens"]),
                       float(data["seconds"]), data.get("calibration", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"a broken {SCHEMA} file ({type(exc).__name__}: {exc})") from None

    def ranked(self, fmt: str) -> list[tuple[str, float]]:
        """(module, KLD) at `fmt`, most sensitive first."""
        i = self.formats.index(fmt)
        return sorted(((m.name, m.options[i].kld) for m in self.modules), key=lambda r: -r[1])


def format_table(scan: Scan, top: int = 5) -> str:
    """The terminal table: per module its 16-bit bytes, then per format KLD and bytes saved;
    the `top` most sensitive modules of each format are starred."""
    starred = {(name, f) for f in scan.formats for name, _ in scan.ranked(f)[:top]}
    width = max(len(m.name) for m in scan.modules)
    head = f"{'module':<{width}}  {'16-bit MiB':>10}" + "".join(
        f"  {f + ' KLD':>16} {'saved MiB':>9}" for f in scan.formats)
    lines = [head]
    for m in scan.modules:
        cells = "".join(f"  {o.kld:>15.3e}{'*' if (m.name, o.format) in starred else ' '}"
                        f" {m.saved(o) / 2**20:>9.3f}" for o in m.options)
        lines.append(f"{m.name:<{width}}  {m.wide_bytes / 2**20:>10.3f}{cells}")
    lines.append(f"{len(scan.modules)} modules x {len(scan.formats)} formats, {scan.chunks} "
                 f"chunks x {scan.ctx} tokens ({scan.scored_tokens} scored) of "
                 f"{scan.calibration or 'calibration text'}, in {scan.seconds:.1f} s; "
                 f"* the {top} most sensitive per format")
    return "\n".join(lines)
