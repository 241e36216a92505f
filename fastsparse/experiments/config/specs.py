"""Config specs of the schedules and of the update schedule, built from the schedule classes of
:mod:`fastsparse.core.schedules` themselves: a schedule's fields and its own checks are written
once, in its class; the config accepts exactly what the class accepts."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, create_model, model_validator,
)

from ...core.schedules import SCHEDULE_TYPE_ALIASES, SCHEDULES, Schedule, UpdateSchedule, check_when

__all__ = ["Spec", "When", "ScheduleSpec", "NumberOrSchedule", "UpdateSpec", "UpdateField", "SCHEDULE_TYPES",
           "check_levels", "update_before"]


def _when(v: Any) -> Any:
    try:
        return check_when(v, "")
    except ValueError as e:
        raise ValueError(str(e).lstrip()) from None


When = Annotated[Union[int, float], BeforeValidator(_when)]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _field_type(tp: Any) -> Any:
    """The config type of a schedule field: steps-or-fractions get the When checks."""
    if tp == Union[int, float]:
        return When
    if typing.get_origin(tp) is Union and set(typing.get_args(tp)) == {int, float, type(None)}:
        return When | None
    return tp


# defaults the config adds to a class's own (a cubic sparsity schedule starts dense)
_CONFIG_DEFAULTS = {"cubic": {"init": 0.0}}


def _spec_for(name: str, cls: type[Schedule]) -> type[Spec]:
    """A pydantic model with ``type`` and the dataclass's fields; it builds (and so checks) the schedule."""
    hints = typing.get_type_hints(cls)
    aliases = [a for a, target in SCHEDULE_TYPE_ALIASES.items() if target == name]
    fields: dict[str, Any] = {"type": (Literal[tuple([name, *aliases])], ...)}
    for f in dataclasses.fields(cls):
        default = ... if f.default is dataclasses.MISSING else f.default
        default = _CONFIG_DEFAULTS.get(name, {}).get(f.name, default)
        fields[f.name] = (_field_type(hints[f.name]), default)

    def build(self) -> Schedule:
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    def checked(self):
        self.build()   # the class's own checks (an empty window, a bad period, ...)
        return self

    fields_model = create_model(f"_{cls.__name__}Fields", __base__=Spec, **fields)
    return type(f"{cls.__name__}Spec", (fields_model,), {
        "__doc__": cls.__doc__, "__module__": __name__, "build": build,
        "_checked": model_validator(mode="after")(checked)})


_SCHEDULE_SPECS = {name: _spec_for(name, cls) for name, cls in SCHEDULES.items()}
SCHEDULE_TYPES = tuple(_SCHEDULE_SPECS)
_LEVEL_FIELDS = ("value", "init", "final", "minimum", "low", "high")


def _schedule_tag(v: Any) -> str | None:
    t = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    t = SCHEDULE_TYPE_ALIASES.get(str(t).lower(), str(t).lower()) if t is not None else None
    return f"§{t}" if t in _SCHEDULE_SPECS else None


ScheduleSpec = Annotated[
    Union[tuple(Annotated[cls, Tag(f"§{name}")] for name, cls in _SCHEDULE_SPECS.items())],
    Discriminator(_schedule_tag, custom_error_type="schedule_type", custom_error_message="unknown schedule type"),
]


def _number_or_schedule(v: Any) -> str | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return "§number"
    return "§schedule" if isinstance(v, (dict, BaseModel)) else None


NumberOrSchedule = Annotated[
    Union[Annotated[float, Tag("§number")], Annotated[ScheduleSpec, Tag("§schedule")]],
    Discriminator(_number_or_schedule, custom_error_type="number_or_schedule",
                  custom_error_message="must be a number or a schedule {type: " + "|".join(SCHEDULE_TYPES)
                                       + ", ...}"),
]


def check_levels(value: Any, low: float, high: float, closed: bool, what: str) -> Any:
    """A number (or each level of a schedule) within [low, high) or [low, high]."""
    def bad(x: float) -> bool:
        return math.isnan(x) or x < low or (x > high if closed else x >= high)

    interval = f"[{low:g}, {high:g}{']' if closed else ')'}"
    if isinstance(value, (int, float)):
        if bad(float(value)):
            hint = " (0 = dense, 0.9 = 90% zeros)" if what == "sparsity" else ""
            raise ValueError(f"{what} must be in {interval}{hint}, got {value}")
    elif isinstance(value, BaseModel):
        for name in _LEVEL_FIELDS:
            x = getattr(value, name, None)
            if x is not None and bad(float(x)):
                raise ValueError(f"the schedule's {name} is a {what} and must be in {interval}, got {x}")
    return value


class UpdateSpec(Spec):
    """When masks change: every ``freq`` steps from ``start`` while before ``stop``, or at ``steps``.
    ``start``/``stop``: a step (integer) or a fraction of training (a float in [0, 1])."""

    freq: int = Field(100, ge=1)
    start: When = 0
    stop: When | None = None
    steps: list[Annotated[int, Field(ge=1)]] | None = None

    @model_validator(mode="after")
    def _checked(self):
        self.build()   # UpdateSchedule's own checks: an empty window, an empty list of steps
        return self

    def build(self) -> UpdateSchedule:
        return UpdateSchedule(freq=self.freq, start=self.start, stop=self.stop, steps=self.steps)


def update_before(v: Any) -> Any:
    return {"steps": v} if isinstance(v, (list, tuple)) else v


UpdateField = Annotated[UpdateSpec | None, BeforeValidator(update_before)]
