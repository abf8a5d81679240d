"""Incremental detokenization with stop strings: text is released only once it can no longer change."""

from __future__ import annotations


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt; with ``chat`` it is wrapped in the model's chat template as one user turn."""
    if not chat:
        return list(tokenizer(text)["input_ids"])
    return encode_messages(tokenizer, [{"role": "user", "content": text}])


def encode_messages(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered by the model's chat template, with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages: this model's tokenizer has no chat template; send the prompt as text")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns an encoding


class IncrementalText:
    """Turns a growing list of token ids into text deltas.

    Holds back an incomplete UTF-8 sequence (decoded as U+FFFD) and any tail that could still become a
    stop string, so text already released never has to be taken back; the final text is cut before the
    first stop string.
    """

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.released = 0  # characters of the text already returned

    def add(self, token_ids: list[int], final: bool = False) -> str:
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            text, final = text[:cut], True
        end = len(text) if final else len(text) - self._unstable_tail(text)
        delta = text[self.released : max(end, self.released)]
        self.released = max(end, self.released)
        return delta

    def _unstable_tail(self, text: str) -> int:
        tail = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    tail = max(tail, n)
                    break
        return tail
