"""Incremental detokenization and stop strings.

Text is emitted only once it is final: never half of a multi-byte UTF-8 character, and never
a prefix that could still grow into a stop string (stop strings are not part of the output).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # tokens before this are already turned into text
        self.read_offset = 0
        self.text = ""  # everything decoded so far, stop string removed once matched
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Appends one generated token; sets ``stopped`` when a stop string appeared."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            start = max(0, len(self.text) - self.hold)
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._find_stop(start)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def _find_stop(self, start: int) -> None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def new_text(self, finished: bool) -> str:
        """Text not handed out before; keeps back what could begin a stop string."""
        end = len(self.text) if finished or self.stopped else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
