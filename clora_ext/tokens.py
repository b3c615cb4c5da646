"""Token positions of subject and trigger phrases (docs/algorithm.md, section 2).

Positions follow the chunked layout that SD text encoders see: every chunk is 77
tokens, BOS + 75 content tokens (padded) + EOS, and chunks are concatenated along
the token axis, so content token j of chunk c sits at global position c*77 + 1 + j.

A tokenizer only has to say which content ids each chunk holds. That fits the
plain CLIP BPE tokenizer (split every 75 tokens) as well as A1111's chunker (BREAK,
comma backtracking and textual-inversion vectors decide where chunks end).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from .concepts import Composition, Variant, find_phrase_spans, find_trigger_spans

CHUNK_LENGTH = 77
CHUNK_CONTENT = CHUNK_LENGTH - 2


class PromptTokenizer(Protocol):
    def chunks(self, text: str) -> list[list[int]]:
        """Content token ids of each 77-token chunk (without BOS, EOS and padding)."""


class BPEChunkTokenizer:
    """Chunks a plain BPE encoding every 75 tokens (no BREAK, no emphasis syntax)."""

    def __init__(self, encode: Callable[[str], list[int]]):
        self._encode = encode

    def chunks(self, text: str) -> list[list[int]]:
        ids = list(self._encode(text))
        return [ids[i : i + CHUNK_CONTENT] for i in range(0, len(ids), CHUNK_CONTENT)] or [[]]


def pad_chunks(chunks: Sequence[Sequence[int]], bos: int, eos: int, pad: int | None = None) -> list[list[int]]:
    """Full 77-id chunks: BOS + content + EOS + padding (``pad`` defaults to EOS, as in SD1.x)."""
    pad = eos if pad is None else pad
    out = []
    for chunk in chunks:
        if len(chunk) > CHUNK_CONTENT:
            raise ValueError(f"a chunk holds at most {CHUNK_CONTENT} tokens, got {len(chunk)}")
        out.append([bos, *chunk, eos] + [pad] * (CHUNK_CONTENT - len(chunk)))
    return out


def content_stream(chunks: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """All content ids in order, and the global position of each."""
    ids: list[int] = []
    positions: list[int] = []
    for c, chunk in enumerate(chunks):
        ids.extend(chunk)
        positions.extend(c * CHUNK_LENGTH + 1 + j for j in range(len(chunk)))
    return ids, positions


# A word of a phrase: letters/digits, with inner apostrophes or hyphens ("ukiyo-e", "cat's").
# The punctuation between words (the comma of "1girl, alice") labels no concept.
_WORD_RUN = re.compile(r"\w+(?:['\u2019-]\w+)*")


class TokenLocator:
    """Token positions of character spans of one text, as the text's own tokenization places them.

    The tokens of ``text[a:b]`` are the ids between the token counts of the prefixes
    ``text[:a]`` and ``text[:b]``: both tokenizers (plain BPE and the host's chunker
    with BREAK, emphasis and comma backtracking) split at word boundaries, so a
    prefix cut at a word boundary tokenizes to a prefix of the whole id stream.
    """

    def __init__(self, tokenizer: PromptTokenizer, text: str):
        self._tokenizer = tokenizer
        self.text = text
        self._ids, self._positions = content_stream(tokenizer.chunks(text))
        self._counts: dict[int, int] = {0: 0, len(text): len(self._ids)}

    def _count(self, end: int) -> int:
        if end not in self._counts:
            self._counts[end] = sum(len(c) for c in self._tokenizer.chunks(self.text[:end]))
        return self._counts[end]

    def positions(self, start: int, end: int) -> list[int]:
        """Global positions of the tokens of the words inside ``text[start:end]``."""
        out: list[int] = []
        for word in _WORD_RUN.finditer(self.text, start, end):
            out.extend(self._positions[self._count(word.start()) : self._count(word.end())])
        return out


def phrase_positions(tokenizer: PromptTokenizer, text: str, phrase: str) -> list[list[int]]:
    """Global token positions of every whole-word occurrence of ``phrase`` in ``text`` (one list per occurrence)."""
    locator = TokenLocator(tokenizer, text)
    return [locator.positions(a, b) for a, b in find_phrase_spans(text, phrase)]


def _overlaps(span: tuple[int, int], others: Sequence[tuple[int, int]]) -> bool:
    return any(span[0] < b and a < span[1] for a, b in others)


@dataclass(frozen=True)
class TokenMapSpec:
    """One attention map to capture: a token of one variant, labelled with its concept."""

    variant: int
    position: int
    concept: int
    mask: bool  # the token belongs to the variant's own mask tokens
    trigger: bool = False  # one of the trigger words the variant inserted (its own subject's otherwise)


def plan_token_maps(
    composition: Composition,
    variants: Sequence[Variant],
    tokenizer: PromptTokenizer,
    texts: Sequence[str] | None = None,
) -> list[TokenMapSpec]:
    """Concept groups of docs/algorithm.md section 2, as a flat list of token maps.

    G_k holds the tokens of subject k in every variant and of trigger k in V_k; the
    mask tokens of V_k are its own subject and trigger tokens. ``texts`` overrides
    the variants' prompts (e.g. one prompt-editing segment of each variant).
    """
    texts = [v.prompt for v in variants] if texts is None else list(texts)
    if len(texts) != len(variants):
        raise ValueError("one text per variant is required")
    specs: list[TokenMapSpec] = []
    for variant, text in zip(variants, texts):
        locator = TokenLocator(tokenizer, text)
        # the trigger is the words the variant inserted right before its subject, not any
        # other occurrence of them ("black" of "a black dog" is not the cat's trigger "black")
        triggers: list[tuple[int, int]] = []
        if variant.trigger and variant.concept is not None:
            triggers = find_trigger_spans(text, variant.trigger, composition.content[variant.concept].subject)
            for a, b in triggers:
                specs.extend(TokenMapSpec(variant.index, p, variant.concept, True, trigger=True)
                             for p in locator.positions(a, b))
        for k, concept in enumerate(composition.content):
            own = variant.concept == k
            for span in find_phrase_spans(text, concept.subject):
                if not _overlaps(span, triggers):  # a subject word inside the trigger is trigger
                    specs.extend(TokenMapSpec(variant.index, p, k, own) for p in locator.positions(*span))
    return list(dict.fromkeys(specs))
