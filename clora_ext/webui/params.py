"""The one parameter model behind the UI, the API and the infotext (pure: no host imports).

The UI builds its components from the field titles, bounds and defaults declared
here; the API accepts either the UI's positional list or one dict of named
parameters; the infotext stores the values that differ from these defaults.
Pydantic 1 API (the host pins pydantic 1.10); ``pydantic.v1`` where pydantic 2 is
installed.
"""

from __future__ import annotations

import enum
from typing import Any, List, Mapping, Sequence

try:  # pydantic 2 (and 1.10.17+) expose the v1 API here
    from pydantic.v1 import BaseModel, Field, ValidationError, validator
except ImportError:  # pragma: no cover - older pydantic 1.10
    from pydantic import BaseModel, Field, ValidationError, validator

from .. import __version__
from ..concepts import MAX_CONCEPTS, Composition, Concept, Role
from ..engine import EngineSettings
from ..masks import MaskTokens, MaskUpsampling, Morphology
from ..update import Schedule

VERSION = __version__
NO_LORA = "None"  # the dropdown's empty choice

ROLE_LABELS = {r.label: r for r in Role}


class CLoRAArgsError(ValueError):
    """Invalid CLoRA arguments. ``status_code``/``detail`` make the host's API answer 422 with the message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.status_code = 422
        self.detail = message


class _Strict(BaseModel):
    class Config:
        extra = "forbid"
        validate_assignment = True


class ConceptArgs(_Strict):
    """One concept row: a subject phrase of the prompt mapped to a LoRA."""

    subject: str = Field("", title="Subject", description="the phrase as written in the prompt", max_length=300)
    lora: str = Field(..., title="LoRA", description="name of an installed LoRA", min_length=1)
    weight: float = Field(1.0, title="UNet weight", ge=-4.0, le=4.0)
    te_weight: float = Field(1.0, title="Text-encoder weight", ge=-4.0, le=4.0)
    trigger: str = Field("", title="Trigger words", description="inserted before the subject", max_length=300)
    role: Role = Field(Role.CONTENT, title="Role")

    @validator("role", pre=True)
    def _role_label(cls, v: Any) -> Any:
        return ROLE_LABELS.get(v, v) if isinstance(v, str) else v

    @validator("lora")
    def _real_lora(cls, v: str) -> str:
        if v.strip() in ("", NO_LORA):
            raise ValueError("a LoRA name is required")
        if any(sep in v for sep in ("/", "\\", "..")):
            raise ValueError("a LoRA name as the Lora tab lists it, not a path ('/', '\\' and '..' are not allowed)")
        return v.strip()

    def concept(self) -> Concept:
        return Concept(self.subject.strip(), self.lora, self.weight, self.te_weight, self.trigger.strip(), self.role)


_ENGINE = EngineSettings()  # every engine default is written there once; the fields below take theirs from it


class CLoRAArgs(_Strict):
    """Everything one CLoRA generation needs. Defaults are the paper's (docs/algorithm.md, sections 4 and 5), except
    5 refinement iterations instead of 20 and masks from the subject words only (docs/quality.md)."""

    enabled: bool = Field(False, title="CLoRA")
    concepts: List[ConceptArgs] = Field(default_factory=list, title="Concepts", max_items=MAX_CONCEPTS)
    step_size: float = Field(_ENGINE.step_size, title="Step size", ge=0.0, le=200.0)
    update_fraction: float = Field(_ENGINE.schedule.update_fraction, title="Fraction of steps with updates", ge=0.0, le=1.0)
    refine_at: List[float] = Field(list(_ENGINE.schedule.refine_at), title="Refine at (fractions of the steps)", max_items=16)
    refine_iterations: int = Field(_ENGINE.schedule.refine_iterations, title="Refine iterations", ge=0, le=100)
    refine_tolerance: float = Field(
        _ENGINE.refine_tolerance or 0.0, title="Refine tolerance (0: the paper's fixed count)", ge=0.0, le=0.5, ui_step=0.005,
        description="refinement stops once an iteration improves the loss by less than this fraction",
    )
    mask_threshold: float = Field(_ENGINE.mask_threshold, title="Mask threshold", ge=0.0, le=1.0)
    morphology: Morphology = Field(_ENGINE.morphology, title="Mask morphology")
    mask_start: float = Field(_ENGINE.schedule.mask_start, title="First step with masks (fraction)", ge=0.0, le=1.0)
    previews: bool = Field(False, title="Previews: attention maps and masks")
    mask_tokens: MaskTokens = Field(
        _ENGINE.mask_tokens, title="Mask words",
        description="which words' attention maps make each LoRA's mask: paper (its trigger and subject words), "
        "subject (its subject words only), base (the base prompt's subject words), base_subject (both)",
    )
    mask_upsampling: MaskUpsampling = Field(
        _ENGINE.mask_upsampling, title="Mask edges",
        description="how the masks grow to the image's size: nearest (hard blocks, the paper's), bilinear (soft "
        "edges) or contour (hard edges along the attention maps' outlines)",
    )
    soft_edges_from: float = Field(
        _ENGINE.soft_edges_from, title="Soft mask edges from (fraction of the steps)", ge=0.0, le=1.0,
        description="from this fraction of the steps on, the masks get soft edges, which clean the grain that hard "
        "seams leave; 1: never (the paper's)",
    )
    keeps_means_from: int = Field(
        _ENGINE.keeps_means_from, title="Keep region colours from this many subjects", ge=0, le=MAX_CONCEPTS,
        description="with this many content LoRAs or more, the latent update leaves each subject region's mean "
        "colour alone on its path through the other prompts' maps (three LoRAs composed better so); 0: never "
        "(the paper's update)",
    )

    @validator("refine_at", pre=True)
    def _parse_fractions(cls, v: Any) -> Any:
        if isinstance(v, str):  # the UI's text box: "0, 0.2, 0.4"
            parts = [p for p in v.replace(";", ",").split(",") if p.strip()]
            try:
                return [float(p) for p in parts]
            except ValueError:
                raise ValueError("expected comma-separated numbers between 0 and 1") from None
        return v

    @validator("refine_at", each_item=True)
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("each refine point is a fraction of the steps between 0 and 1")
        return v

    @validator("concepts")
    def _composable(cls, v: List[ConceptArgs]) -> List[ConceptArgs]:
        Composition.from_concepts([c.concept() for c in v])  # raises ValueError with a readable message
        return v

    # -- conversions ----------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.enabled and bool(self.concepts)

    def composition(self) -> Composition:
        return Composition.from_concepts([c.concept() for c in self.concepts])

    def engine_settings(self) -> EngineSettings:
        schedule = Schedule(
            update_fraction=self.update_fraction,
            refine_at=tuple(self.refine_at),
            refine_iterations=self.refine_iterations,
            mask_start=self.mask_start,
        )
        return EngineSettings(
            step_size=self.step_size,
            schedule=schedule,
            refine_tolerance=self.refine_tolerance or None,
            mask_threshold=self.mask_threshold,
            morphology=self.morphology,
            mask_tokens=self.mask_tokens,
            mask_upsampling=self.mask_upsampling,
            soft_edges_from=self.soft_edges_from,
            keeps_means_from=self.keeps_means_from,
        )

    def non_default(self) -> dict:
        """Values that differ from the model's defaults (concepts: subject and LoRA always kept)."""
        out: dict = {}
        for name, field in self.__fields__.items():
            if name in ("enabled", "concepts"):
                continue
            value = _plain(getattr(self, name))
            if value != _plain(field.get_default()):
                out[name] = value
        if self.concepts:
            out["concepts"] = [_concept_non_default(c) for c in self.concepts]
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _concept_non_default(c: ConceptArgs) -> dict:
    out = {"subject": c.subject, "lora": c.lora}
    for name, field in ConceptArgs.__fields__.items():
        value = _plain(getattr(c, name))
        if name not in out and value != _plain(field.get_default()):
            out[name] = value
    return out


# -- the positional (UI) form ------------------------------------------------------------------

ROW_FIELDS = ("subject", "lora", "weight", "te_weight", "trigger", "role")
SETTING_FIELDS = (
    "step_size",
    "update_fraction",
    "refine_at",
    "refine_iterations",
    "refine_tolerance",
    "mask_threshold",
    "morphology",
    "mask_start",
    "previews",
    # added since 0.4.0, at the end: positional lists written before them still parse
    "mask_tokens",
    "mask_upsampling",
    "soft_edges_from",  # since 0.6.0
    "keeps_means_from",  # since 0.7.0
)
POSITIONAL_LENGTH = 1 + MAX_CONCEPTS * len(ROW_FIELDS) + len(SETTING_FIELDS)


def row_defaults() -> dict:
    """What an empty UI row holds."""
    fields = ConceptArgs.__fields__
    values = {name: _plain(fields[name].get_default()) for name in ROW_FIELDS}
    values["lora"] = NO_LORA
    values["role"] = Role.CONTENT.label
    return values


def ui_value(name: str, value: Any) -> Any:
    """A model value as its UI component holds it."""
    if name == "refine_at":
        return ", ".join(f"{v:g}" for v in value)
    if name == "role":
        return Role(value).label
    return _plain(value)


def to_positional(args: CLoRAArgs) -> list:
    """The UI's positional list for ``args`` (the inverse of ``parse_args`` on a list)."""
    out: list = [args.enabled]
    for i in range(MAX_CONCEPTS):
        row = args.concepts[i].dict() if i < len(args.concepts) else row_defaults()
        out.extend(ui_value(name, row[name]) for name in ROW_FIELDS)
    out.extend(ui_value(name, getattr(args, name)) for name in SETTING_FIELDS)
    return out


def _from_positional(values: Sequence[Any], defaults: Mapping[str, Any]) -> dict:
    if len(values) > POSITIONAL_LENGTH:
        raise CLoRAArgsError(f"CLoRA: expected at most {POSITIONAL_LENGTH} positional arguments, got {len(values)}")
    fields = CLoRAArgs.__fields__
    data: dict = {"enabled": values[0] if values else fields["enabled"].get_default()}
    concepts = []
    for i in range(MAX_CONCEPTS):
        start = 1 + i * len(ROW_FIELDS)
        chunk = list(values[start : start + len(ROW_FIELDS)])
        row = dict(row_defaults(), **dict(zip(ROW_FIELDS, chunk)))
        lora = row["lora"]
        if lora is None or str(lora).strip() in ("", NO_LORA):
            if str(row["subject"] or "").strip() and row.get("role") != Role.STYLE.label:
                raise CLoRAArgsError(f"CLoRA: concepts[{i}].lora: row {i + 1} has a subject but no LoRA; "
                                     "choose a LoRA or clear the subject")
            continue
        concepts.append(row)
    data["concepts"] = concepts
    offset = 1 + MAX_CONCEPTS * len(ROW_FIELDS)
    for j, name in enumerate(SETTING_FIELDS):
        if offset + j < len(values) and values[offset + j] is not None:
            data[name] = values[offset + j]
        elif name in defaults:
            data[name] = defaults[name]
    return data


def parse_args(args: Sequence[Any], defaults: Mapping[str, Any] | None = None) -> CLoRAArgs:
    """Script args as the host hands them over: the UI's positional list, or ``[dict]`` (API).

    ``defaults`` (the Settings tab's values) fill parameters a dict or a short list leaves out.
    """
    defaults = dict(defaults or {})
    if args and isinstance(args[0], CLoRAArgs):
        return args[0]
    if args and isinstance(args[0], Mapping):
        given = dict(args[0])
        given.setdefault("enabled", True)  # a dict of parameters is a request to use CLoRA
        data = {**{k: v for k, v in defaults.items() if k in SETTING_FIELDS}, **given}
    else:
        data = _from_positional(list(args), defaults)
    return validate(data)


def validate(data: Mapping[str, Any]) -> CLoRAArgs:
    try:
        return CLoRAArgs.parse_obj(data)
    except ValidationError as e:
        raise CLoRAArgsError(format_errors(e)) from None


MAX_REPORTED = 5  # errors listed in one message; the rest are counted


def format_errors(error: ValidationError) -> str:
    """One line naming each bad field and what it accepts (user text is escaped, never echoed raw)."""
    errors = error.errors()
    lines = []
    for err in errors[:MAX_REPORTED]:
        # custom checks and enum errors already say what is allowed
        allowed = "" if err["type"] in ("value_error", "type_error.enum") else _allowed(err)
        lines.append(f"{_loc(err['loc'])}: {err['msg']}" + (f" (allowed: {allowed})" if allowed else ""))
    if len(errors) > MAX_REPORTED:
        lines.append(f"and {len(errors) - MAX_REPORTED} more")
    message = "CLoRA: invalid arguments: " + "; ".join(lines)
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if part == "__root__":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        name = part if str(part).isidentifier() else repr(part)[:40]
        out += f".{name}" if out else name
    return out or "arguments"


def _allowed(err: Mapping[str, Any]) -> str:
    """What the field at ``err['loc']`` accepts, from the model's own declarations."""
    model: type[BaseModel] = CLoRAArgs
    field = None
    for part in err["loc"]:
        if isinstance(part, int) or part == "__root__":
            continue
        if field is not None and isinstance(field.type_, type) and issubclass(field.type_, BaseModel):
            model = field.type_
        field = model.__fields__.get(part)
        if field is None:
            return "fields " + ", ".join(model.__fields__)
    if field is None:
        return ""
    info = field.field_info
    if isinstance(field.type_, type) and issubclass(field.type_, enum.Enum):
        choices = [m.value for m in field.type_]
        return ", ".join(repr(c) for c in dict.fromkeys(choices))
    if info.ge is not None and info.le is not None:
        kind = "an integer" if field.type_ is int or "Int" in field.type_.__name__ else "a number"
        return f"{kind} from {info.ge:g} to {info.le:g}"
    if field.name == "refine_at":
        return "a list of fractions between 0 and 1"
    if field.name == "concepts":
        return f"a list of at most {MAX_CONCEPTS} concepts {{subject, lora, weight, te_weight, trigger, role}}"
    return info.description or ""
