"""Prompt encoding and incremental detokenization with stop strings."""

import copy

from tiny import tiny_tokenizer

from specdec_core.text import IncrementalText, encode_prompt


def test_encode_prompt_plain_and_chat_template():
    tok = copy.deepcopy(tiny_tokenizer())
    assert encode_prompt(tok, "def add(a, b):") == tok("def add(a, b):")["input_ids"]
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    ids = encode_prompt(tok, "print(i)", chat=True)
    assert tok.decode(ids) == "[user] print(i)\n[assistant] "


def test_incremental_text_releases_nothing_it_must_take_back():
    tok = tiny_tokenizer()
    ids = tok("for i in range(10):\n    print(i)\n")["input_ids"]
    stop = "print"
    text = IncrementalText(tok, (stop,))
    released = "".join(text.add([t]) for t in ids[:-1]) + text.add(ids[-1:], final=True)
    full = tok.decode(ids)
    assert released == full[: full.index(stop)]  # cut before the stop string, no partial "pri" leaked
    plain = IncrementalText(tok)
    assert "".join(plain.add([t]) for t in ids[:-1]) + plain.add(ids[-1:], final=True) == full
