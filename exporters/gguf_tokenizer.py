"""A GGUF's SentencePiece vocabulary as the tokenizer llama.cpp runs, in ``tokenizers`` form.

GGUF files of SentencePiece models (``tokenizer.ggml.model == "llama"``: Gemma, Llama 2,
Mistral) carry the pieces, their scores and types but no merges. llama.cpp tokenizes them as
SentencePiece's BPE does: user-defined and control pieces are matched in the raw text first,
spaces become "▁", then adjacent symbols are merged greedily, the pair whose merged piece has
the highest score first, and what no piece covers falls back to ``<0xXX>`` byte pieces.

transformers 4.57's converter for Gemma GGUFs builds a *Unigram* model from those scores
instead: the scores of a BPE vocabulary are negative merge ranks, not log-probabilities, so a
Unigram prefers many early short pieces ("temperature" became "▁t em per at ure") and a
Gemma 3 model read that way completes "Water boils at a temperature of" with nonsense. The
BPE below is the same rule written as ranked merges: every split of a piece into two pieces
is a merge, ranked by the merged piece's score.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class SpmVocab:
    """What a GGUF says about its SentencePiece tokenizer."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None


def read_spm_vocab(reader) -> SpmVocab | None:
    """The SentencePiece vocabulary of an open ``gguf.GGUFReader``; None when the GGUF's
    tokenizer is another kind (BPE with merges, as SmolLM2's gpt2 one), which transformers
    converts correctly."""
    fields = reader.fields

    def value(key, default=None):
        field = fields.get(key)
        return field.contents() if field is not None else default

    if value("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.merges" in fields:
        return None
    tokens = value("tokenizer.ggml.tokens")
    count = len(tokens)
    return SpmVocab(
        tokens=tokens,
        scores=value("tokenizer.ggml.scores") or [0.0] * count,
        types=value("tokenizer.ggml.token_type") or [NORMAL] * count,
        bos_id=value("tokenizer.ggml.bos_token_id"),
        eos_id=value("tokenizer.ggml.eos_token_id"),
        unk_id=value("tokenizer.ggml.unknown_token_id"),
        pad_id=value("tokenizer.ggml.padding_token_id"),
        add_bos=bool(value("tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(value("tokenizer.ggml.add_eos_token", False)),
        # llama.cpp's default for SentencePiece vocabularies when the key is absent
        add_space_prefix=bool(value("tokenizer.ggml.add_space_prefix", True)),
        chat_template=value("tokenizer.chat_template"),
    )


def merges_by_score(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple]:
    """Every (left, right) whose concatenation is a normal piece, best merged score first."""
    mergeable = {t for t, kind in zip(tokens, types) if kind in (NORMAL, UNUSED)}
    ranked = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, len(ranked), left, right))
    ranked.sort()
    return [(left, right) for _score, _order, left, right in ranked]


def build_tokenizer(vocab: SpmVocab) -> Tokenizer:
    """The ``tokenizers`` form of ``vocab``, tokenizing as llama.cpp does."""
    ids = {}
    for i, piece in enumerate(vocab.tokens):
        ids.setdefault(piece, i)
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    tokenizer = Tokenizer(models.BPE(
        vocab=ids, merges=merges_by_score(vocab.tokens, vocab.scores, vocab.types),
        unk_token=unk, byte_fallback=BYTE in vocab.types, fuse_unk=True,
    ))
    # llama.cpp prefixes a space to every run of text that starts the input or follows a
    # special piece; the normalizer runs on exactly those runs.
    spaces = [normalizers.Prepend("▁")] if vocab.add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence(spaces + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    # Matched in the raw text before any piece, as llama.cpp's special-token partition does.
    tokenizer.add_tokens([
        AddedToken(piece, special=kind in (CONTROL, UNKNOWN), normalized=False)
        for piece, kind in zip(vocab.tokens, vocab.types)
        if kind in (CONTROL, UNKNOWN, USER_DEFINED)
    ])
    tokenizer.post_processor = _post_processor(vocab)
    return tokenizer


def _post_processor(vocab: SpmVocab):
    """BOS/EOS added around a sequence as the GGUF asks (``add_special_tokens=True``)."""
    bos = vocab.bos_id if vocab.add_bos else None
    eos = vocab.eos_id if vocab.add_eos else None
    head = [vocab.tokens[bos]] if bos is not None else []
    tail = [vocab.tokens[eos]] if eos is not None else []
    # by id: a piece's first index in a 262k list is slow to find, and not always its id
    specials = [(vocab.tokens[i], i) for i in dict.fromkeys(i for i in (bos, eos) if i is not None)]
    return processors.TemplateProcessing(
        single=" ".join(head + ["$A"] + tail),
        pair=" ".join(head + ["$A"] + tail + ["$B:1"] + tail),
        special_tokens=specials,
    )


def save_tokenizer(vocab: SpmVocab, folder) -> None:
    """Write tokenizer.json and tokenizer_config.json (read by transformers and the agent)."""
    from transformers import PreTrainedTokenizerFast

    def piece(i):
        return vocab.tokens[i] if i is not None else None

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(vocab), bos_token=piece(vocab.bos_id),
        eos_token=piece(vocab.eos_id), unk_token=piece(vocab.unk_id),
        pad_token=piece(vocab.pad_id), clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    if vocab.chat_template:
        fast.chat_template = vocab.chat_template
    fast.save_pretrained(folder)
