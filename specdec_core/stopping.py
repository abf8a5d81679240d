"""When a generation ends, and the chunks it emits: the token budget, end-of-sequence ids, stop strings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopCriteria:
    """When a generation ends: a token budget, end-of-sequence ids, stop strings (need a tokenizer)."""

    max_new_tokens: int = 128
    eos_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()


@dataclass
class Chunk:
    """Tokens emitted by one round (already cut at a stop condition)."""

    token_ids: list[int]
    finish_reason: str | None = None  # "length" | "eos" | "stop" once finished


class Stopper:
    """Applies the token budget, EOS ids and stop strings to the emitted stream."""

    def __init__(self, stop: StopCriteria, tokenizer) -> None:
        if stop.stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.stop = stop
        self.tokenizer = tokenizer
        self.generated: list[int] = []

    @property
    def produced(self) -> int:
        return len(self.generated)

    def cut(self, emitted: list[int]) -> Chunk:
        room = self.stop.max_new_tokens - len(self.generated)
        out: list[int] = []
        for token in emitted[:room]:
            out.append(token)
            self.generated.append(token)
            if token in self.stop.eos_token_ids:
                return Chunk(out, "eos")
            if self.stop.stop_strings and self._hit_stop_string():
                return Chunk(out, "stop")
        return Chunk(out, "length" if len(self.generated) >= self.stop.max_new_tokens else None)

    def _hit_stop_string(self) -> bool:
        # only the tail can newly contain a stop string; decode a window wide enough for the longest one
        window = self.generated[-(max(len(s) for s in self.stop.stop_strings) + 8) :]
        text = self.tokenizer.decode(window, skip_special_tokens=False)
        return any(s in text for s in self.stop.stop_strings)
