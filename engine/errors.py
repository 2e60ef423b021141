"""Errors caused by user input or the environment.

The CLI prints their message without a traceback; anything else is a bug and keeps its
traceback.
"""


class NibbleError(Exception):
    """An error caused by user input or the environment; the CLI prints its message without a traceback."""


class ConfigError(NibbleError, ValueError):
    """A bad option: unknown key, unknown quantization string, malformed rule."""


class CheckpointError(NibbleError):
    """A checkpoint that cannot be read: corrupt, truncated, unsupported or incomplete."""


class HubError(NibbleError):
    """Turning a model name into local files failed (engine/hub.py)."""


class ModelNotFoundError(HubError):
    """A model name that is no alias, no local path, and not reachable on a hub."""


class FetchError(HubError):
    """An alias's file could not be downloaded, or its bytes do not match the pinned sha256."""
