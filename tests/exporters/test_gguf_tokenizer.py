"""A GGUF's SentencePiece vocabulary tokenizes as llama.cpp does.

The oracle here is a direct transcription of llama.cpp's SentencePiece merge rule
(``llm_tokenizer_spm``: merge the adjacent pair whose merged piece has the best score,
leftmost first; then byte pieces for what no piece covers), run on small vocabularies built
here. llama.cpp's own ids for the real Gemma 3 vocabulary are checked against the served
bundle in ``tests/e2e/test_gemma3.py``.
"""

from __future__ import annotations

import random

import pytest

from exporters.gguf_tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    USER_DEFINED,
    SpmVocab,
    build_tokenizer,
    merges_by_score,
)


def spm_reference(vocab: SpmVocab, text: str) -> list[int]:
    """llama.cpp's SPM tokenizer on text without special pieces (BOS added)."""
    ids = {t: i for i, t in enumerate(vocab.tokens) if vocab.types[i] in (NORMAL, BYTE)}
    if vocab.add_space_prefix:
        text = " " + text
    symbols = list(text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            merged = symbols[i] + symbols[i + 1]
            if merged in ids and vocab.types[ids[merged]] == NORMAL:
                score = vocab.scores[ids[merged]]
                if best is None or score > best[0]:
                    best = (score, i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    out = [vocab.bos_id]
    for sym in symbols:
        if sym in ids:
            out.append(ids[sym])
        else:
            out.extend(ids[f"<0x{b:02X}>"] for b in sym.encode())
    return out


def small_vocab(add_space_prefix: bool) -> SpmVocab:
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [CONTROL, CONTROL, CONTROL] + [BYTE] * 256
    normal = ["▁", "a", "b", "c", "d", "ab", "bc", "cd", "abc", "bcd", "▁a", "▁ab", "▁abc",
              "da", "dab", "cda", "aa", "aaa", "▁d", "▁dd", "dd"]
    rng = random.Random(7)
    scores = [0.0] * len(pieces) + [-float(rng.randrange(1000)) for _ in normal]
    pieces += normal
    types += [NORMAL] * len(normal)
    return SpmVocab(tokens=pieces, scores=scores, types=types, bos_id=1, eos_id=2, unk_id=0,
                    pad_id=None, add_bos=True, add_eos=False,
                    add_space_prefix=add_space_prefix, chat_template=None)


@pytest.mark.parametrize("add_space_prefix", [False, True])
def test_merges_follow_llamacpp_spm_rule_on_random_text(add_space_prefix):
    vocab = small_vocab(add_space_prefix)
    tokenizer = build_tokenizer(vocab)
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abcd  é") for _ in range(rng.randrange(1, 14)))
        assert tokenizer.encode(text).ids == spm_reference(vocab, text), text


def test_merges_rank_by_the_merged_pieces_score():
    merges = merges_by_score(["a", "b", "c", "ab", "bc", "abc"], [0, 0, 0, -5.0, -1.0, -3.0],
                             [NORMAL] * 6)
    assert merges == [("b", "c"), ("a", "bc"), ("ab", "c"), ("a", "b")]


def test_user_defined_and_control_pieces_are_matched_whole_and_decode_back():
    vocab = small_vocab(False)
    tokens = vocab.tokens + ["<start>", "\n\n"]
    types = vocab.types + [CONTROL, USER_DEFINED]
    vocab = SpmVocab(**{**vocab.__dict__, "tokens": tokens, "types": types,
                        "scores": vocab.scores + [0.0, 0.0]})
    tokenizer = build_tokenizer(vocab)
    enc = tokenizer.encode("ab<start>\n\ncd")
    assert enc.tokens == ["<s>", "ab", "<start>", "\n\n", "cd"]
    assert tokenizer.decode(enc.ids, skip_special_tokens=True) == "ab\n\ncd"
