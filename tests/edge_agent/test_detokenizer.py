"""Incremental decoding never emits broken UTF-8 and never emits a stop string.

The tokenizer is the small byte-level BPE of ``bpe_tokenizer`` (tests/conftest.py): trained on
English only, so accented letters, CJK and emoji fall apart into single bytes, the case a
detokenizer must get right.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from edge_agent.text.detokenizer import IncrementalDetokenizer

TEXT = "Héllo wörld! 日本語のテキスト 🎉🚀 done.\nNew line; naïve café."


@pytest.fixture(scope="module")
def tok(bpe_tokenizer) -> Tokenizer:
    return bpe_tokenizer


@pytest.mark.parametrize("char", ["é", "日", "🎉"])
def test_the_tokenizer_splits_multibyte_characters_across_tokens(tok, char):
    """The premise of the tests below."""
    ids = tok.encode(char, add_special_tokens=False).ids
    assert len(ids) == len(char.encode())
    assert all("\ufffd" in tok.decode([i]) for i in ids)


def test_incremental_text_equals_full_decode_and_is_valid_utf8(tok):
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    # emoji and CJK are split across byte-level tokens, so some steps must have held text back
    assert "" in pieces[:-1]


@pytest.mark.parametrize("stop", ["wörld", "🚀", "\nNew", "café."])
def test_stop_string_cuts_and_is_not_emitted(tok, stop):
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    d = IncrementalDetokenizer(tok, (stop, "never-there"))
    out = ""
    for i in ids:
        out += d.add(i)
        if d.stopped:
            break
    else:
        out += d.flush()
    assert d.stopped
    assert out == TEXT[: TEXT.index(stop)]


def test_partial_stop_prefix_is_released_at_the_end(tok):
    ids = tok.encode("the end of sto", add_special_tokens=False).ids
    d = IncrementalDetokenizer(tok, ("stop",))
    out = "".join(d.add(i) for i in ids)
    assert not out.endswith("sto")
    assert out + d.flush() == "the end of sto" and not d.stopped
