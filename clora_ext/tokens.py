"""Token positions of subject and trigger phrases (docs/algorithm.md, section 2).

Positions follow the chunked layout that SD text encoders see: every chunk is 77
tokens, BOS + 75 content tokens (padded) + EOS, and chunks are concatenated along
the token axis, so content token j of chunk c sits at global position c*77 + 1 + j.

A tokenizer only has to say which content ids each chunk holds. That fits the
plain CLIP BPE tokenizer (split every 75 tokens) as well as A1111's chunker (BREAK,
comma backtracking and textual-inversion vectors decide where chunks end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from .concepts import Composition, PhraseNotFound, Variant

CHUNK_LENGTH = 77
CHUNK_CONTENT = CHUNK_LENGTH - 2


class PromptTokenizer(Protocol):
    def chunks(self, text: str) -> list[list[int]]:
        """Content token ids of each 77-token chunk (without BOS, EOS and padding)."""

    def phrase_ids(self, phrase: str) -> list[int]:
        """Token ids of a phrase on its own (without BOS/EOS)."""


class BPEChunkTokenizer:
    """Chunks a plain BPE encoding every 75 tokens (no BREAK, no emphasis syntax)."""

    def __init__(self, encode: Callable[[str], list[int]]):
        self._encode = encode

    def chunks(self, text: str) -> list[list[int]]:
        ids = list(self._encode(text))
        return [ids[i : i + CHUNK_CONTENT] for i in range(0, len(ids), CHUNK_CONTENT)] or [[]]

    def phrase_ids(self, phrase: str) -> list[int]:
        return list(self._encode(phrase))


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


def phrase_positions(tokenizer: PromptTokenizer, text: str, phrase: str) -> list[list[int]]:
    """Global token positions of every occurrence of ``phrase`` in ``text`` (one list per occurrence)."""
    needle = tokenizer.phrase_ids(phrase)
    if not needle:
        raise ValueError(f"phrase {phrase!r} has no tokens")
    ids, positions = content_stream(tokenizer.chunks(text))
    n = len(needle)
    hits = [positions[i : i + n] for i in range(len(ids) - n + 1) if ids[i : i + n] == needle]
    if not hits:
        raise PhraseNotFound(phrase, text)
    return hits


@dataclass(frozen=True)
class TokenMapSpec:
    """One attention map to capture: a token of one variant, labelled with its concept."""

    variant: int
    position: int
    concept: int
    mask: bool  # the token belongs to the variant's own mask tokens


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
        for k, concept in enumerate(composition.content):
            own = variant.concept == k
            for occurrence in phrase_positions(tokenizer, text, concept.subject):
                specs.extend(TokenMapSpec(variant.index, p, k, own) for p in occurrence)
            if own and variant.trigger:
                for occurrence in phrase_positions(tokenizer, text, variant.trigger):
                    specs.extend(TokenMapSpec(variant.index, p, k, True) for p in occurrence)
    # a trigger that repeats a subject word would list a position twice
    return list(dict.fromkeys(specs))
