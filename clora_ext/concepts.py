"""Concepts and prompt variants (docs/algorithm.md, sections 1 and 2).

A *concept* maps a subject phrase of the prompt to a LoRA. Content concepts get a
prompt variant of their own: the base prompt with the concept's trigger words
inserted right before every occurrence of its subject phrase. Style concepts get
no variant: they are routed onto the variants they apply to.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

MAX_CONCEPTS = 8


class Role(str, enum.Enum):
    """How a concept's LoRA takes part in the composition."""

    CONTENT = "content"  # its own variant, its own mask
    STYLE = "style"  # every variant, every pixel
    STYLE_SUBJECTS = "style_subjects"  # only the variants of the listed subjects

    @property
    def label(self) -> str:
        return {"content": "content", "style": "style (whole image)", "style_subjects": "style (listed subjects)"}[self.value]


class PhraseNotFound(ValueError):
    """A subject phrase does not occur in the prompt."""

    def __init__(self, phrase: str, prompt: str):
        words = " ".join(_WORD.findall(prompt)) or "(empty)"
        super().__init__(f"subject {phrase!r} does not occur in the prompt {prompt!r}; its words are: {words}")
        self.phrase = phrase
        self.prompt = prompt


_WORD = re.compile(r"[\w'-]+")


@dataclass(frozen=True)
class Concept:
    """One subject-to-LoRA mapping as the user states it.

    ``subject`` is the phrase as written in the prompt. For ``Role.STYLE_SUBJECTS``
    it lists the content subjects the style attaches to, comma separated; for
    ``Role.STYLE`` it is ignored.
    """

    subject: str
    lora: str
    weight: float = 1.0
    te_weight: float = 1.0
    trigger: str = ""
    role: Role = Role.CONTENT

    def attached_subjects(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.subject.split(",") if s.strip())


@dataclass(frozen=True)
class Variant:
    """One prompt variant: index 0 is the base prompt, k >= 1 belongs to content concept k-1."""

    index: int
    prompt: str
    concept: int | None  # index into Composition.content
    trigger: str = ""  # trigger words inserted before the subject (content concepts)


@dataclass(frozen=True)
class Composition:
    """The concepts of one generation, split by role, and the variants they imply."""

    content: tuple[Concept, ...]
    styles: tuple[Concept, ...] = field(default=())

    @classmethod
    def from_concepts(cls, concepts: list[Concept] | tuple[Concept, ...]) -> "Composition":
        if len(concepts) > MAX_CONCEPTS:
            raise ValueError(f"at most {MAX_CONCEPTS} concepts are supported, got {len(concepts)}")
        content = tuple(c for c in concepts if c.role is Role.CONTENT)
        styles = tuple(c for c in concepts if c.role is not Role.CONTENT)
        seen: set[str] = set()
        for c in content:
            key = normalise_phrase(c.subject)
            if not key:
                raise ValueError(f"concept for LoRA {c.lora!r} has an empty subject phrase")
            if key in seen:
                raise ValueError(f"subject {c.subject!r} is mapped twice; each subject may have one content LoRA")
            for other in seen:
                if _contains_words(key, other) or _contains_words(other, key):
                    raise ValueError(
                        f"subjects {other!r} and {key!r} overlap (one is part of the other), so the words they share "
                        "would belong to two LoRAs at once; give each subject words of its own"
                    )
            seen.add(key)
        for s in styles:
            if s.role is Role.STYLE_SUBJECTS:
                attached = s.attached_subjects()
                if not attached:
                    raise ValueError(f"style LoRA {s.lora!r} lists no subjects to attach to")
                for a in attached:
                    if normalise_phrase(a) not in seen:
                        raise ValueError(
                            f"style LoRA {s.lora!r} attaches to {a!r}, which is not a content subject "
                            f"(content subjects: {', '.join(c.subject for c in content) or 'none'})"
                        )
        return cls(content=content, styles=styles)

    def variants(self, prompt: str) -> list[Variant]:
        """V_0 = prompt; V_k = prompt with trigger words of concept k (and of styles attached to it)."""
        for c in self.content:
            find_phrase_spans(prompt, c.subject)  # raises PhraseNotFound
        out = [Variant(0, self._with_global_styles(prompt), None)]
        for k, c in enumerate(self.content):
            trigger = " ".join(t for t in [c.trigger.strip(), *self._attached_style_triggers(c)] if t)
            text = insert_before_phrase(prompt, c.subject, trigger) if trigger else prompt
            out.append(Variant(k + 1, self._with_global_styles(text), k, trigger))
        return out

    def styles_for_variant(self, variant: Variant) -> list[Concept]:
        """Style concepts routed onto this variant's rows."""
        chosen = [s for s in self.styles if s.role is Role.STYLE]
        if variant.concept is not None:
            subject = normalise_phrase(self.content[variant.concept].subject)
            chosen += [
                s
                for s in self.styles
                if s.role is Role.STYLE_SUBJECTS and subject in {normalise_phrase(a) for a in s.attached_subjects()}
            ]
        return chosen

    def _attached_style_triggers(self, concept: Concept) -> list[str]:
        subject = normalise_phrase(concept.subject)
        return [
            s.trigger.strip()
            for s in self.styles
            if s.role is Role.STYLE_SUBJECTS
            and s.trigger.strip()
            and subject in {normalise_phrase(a) for a in s.attached_subjects()}
        ]

    def _with_global_styles(self, prompt: str) -> str:
        triggers = [s.trigger.strip() for s in self.styles if s.role is Role.STYLE and s.trigger.strip()]
        return ", ".join([prompt, *triggers]) if triggers else prompt


def normalise_phrase(phrase: str) -> str:
    return " ".join(phrase.lower().split())


def _contains_words(phrase: str, part: str) -> bool:
    """Whether normalised ``part`` occurs in normalised ``phrase`` as whole words ("cat" in "cat toy")."""
    return f" {part} " in f" {phrase} "


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    words = phrase.split()
    if not words:
        raise ValueError("empty subject phrase")
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<![\w]){body}(?![\w])", re.IGNORECASE)


def find_phrase_spans(prompt: str, phrase: str) -> list[tuple[int, int]]:
    """Character spans of every whole-word, case-insensitive occurrence of ``phrase``."""
    spans = [m.span() for m in _phrase_pattern(phrase).finditer(prompt)]
    if not spans:
        raise PhraseNotFound(phrase, prompt)
    return spans


def find_trigger_spans(text: str, trigger: str, subject: str) -> list[tuple[int, int]]:
    """Spans of ``trigger`` where it stands right before ``subject`` (where ``insert_before_phrase`` put it)."""
    t, p = _phrase_pattern(trigger).pattern, _phrase_pattern(subject).pattern
    pattern = re.compile(rf"(?P<trigger>{t})\s+(?={p})", re.IGNORECASE)
    return [m.span("trigger") for m in pattern.finditer(text)]


def insert_before_phrase(prompt: str, phrase: str, words: str) -> str:
    """Insert ``words`` right before every occurrence of ``phrase``."""
    out, last = [], 0
    for start, end in find_phrase_spans(prompt, phrase):
        out.append(prompt[last:start])
        out.append(f"{words} ")
        out.append(prompt[start:end])
        last = end
    out.append(prompt[last:])
    return "".join(out)
