"""The schema of an experiment and of its ``sparsity`` block (pydantic), generic keys only:
what every algorithm shares. The keys of one algorithm are its constructor's (:mod:`.keys`)."""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator,
)

from ...algorithms.base import get_algorithm
from ...core.distributions import DISTRIBUTIONS
from ...core.schedules import Constant, Cosine, Schedule, StepDecay, Warmup
from .errors import suggest
from .specs import NumberOrSchedule, Spec, UpdateField, UpdateSpec, check_levels

__all__ = ["SparsityBlock", "OverlaySpec", "DataSpec", "ModelSpec", "OptimizerSpec", "LRScheduleSpec",
           "ExperimentConfig", "VOCABULARY", "PASSED_AS_IS", "RESERVED", "EXPERIMENT_ONLY"]


def _globs(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class _BlockFields(BaseModel):
    """What every block and overlay may set, whatever the algorithm. Every other key belongs to the
    algorithm: it is validated against the algorithm's own typed parameters (:mod:`.keys`)."""

    model_config = ConfigDict(extra="allow")

    sparsity: NumberOrSchedule | None = None
    distribution: str | None = None
    init_method: Literal["random", "topk", "from_zeros"] | None = None
    update: UpdateField = None
    add_summaries: bool | None = None

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, v):
        return check_levels(v, 0.0, 1.0, False, "sparsity")

    @field_validator("distribution")
    @classmethod
    def _known_distribution(cls, v):
        if v is not None and v.lower() not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {v!r}{suggest(v.lower(), DISTRIBUTIONS)}; "
                             f"valid: {sorted(DISTRIBUTIONS)}")
        return v


def known_algorithm(v: Any) -> Any:
    if isinstance(v, str):
        try:
            get_algorithm(v)
        except ValueError as e:
            hint = " (for dense training, leave out the sparsity block)" if v.lower() == "dense" else ""
            raise ValueError(f"{e}{hint}") from None
        return v.lower()
    return v


class OverlaySpec(_BlockFields):
    """Overrides for the parameters one ``param_filters`` pattern matches."""

    algorithm: Annotated[str | None, BeforeValidator(known_algorithm)] = None


class SparsityBlock(_BlockFields):
    """One algorithm (and its overlays) over the parameters its filter selects."""

    algorithm: Annotated[str, BeforeValidator(known_algorithm)] = "static"
    param_filter: Annotated[list[str] | None, BeforeValidator(_globs)] = None
    exclude: Annotated[list[str] | None, BeforeValidator(_globs)] = None
    param_filters: dict[str, OverlaySpec] | None = None


def _block_or_list(v: Any) -> str | None:
    if isinstance(v, (dict, BaseModel)):
        return "§block"
    return "§list" if isinstance(v, list) else None


SparsityField = Annotated[
    Union[Annotated[SparsityBlock, Tag("§block")], Annotated[list[SparsityBlock], Tag("§list")]],
    Discriminator(_block_or_list, custom_error_type="sparsity_type",
                  custom_error_message="must be a sparsity block (a mapping) or a list of blocks"),
]


# --- the experiment ---------------------------------------------------------------------------
class DataSpec(BaseModel):
    """``name`` of a data set (:data:`fastsparse.experiments.data.DATASETS`), ``batch_size``, and the loader's keywords."""

    model_config = ConfigDict(extra="allow")
    name: str = "digits"
    batch_size: int = Field(64, ge=1)


class ModelSpec(BaseModel):
    """``name`` of a model (:data:`fastsparse.experiments.models.MODELS`) and the builder's keywords."""

    model_config = ConfigDict(extra="allow")
    name: str = "mlp"


class OptimizerSpec(BaseModel):
    """``sgd``, ``adam`` or ``adamw`` with ``lr``, ``weight_decay`` and the torch optimizer's keywords."""

    model_config = ConfigDict(extra="allow")
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class LRScheduleSpec(Spec):
    """Learning rate per step: ``constant``; ``cosine`` to ``minimum`` (a factor of lr) at the end;
    ``step``: times ``gamma`` at each of ``milestones`` (epochs). ``warmup_epochs``: linear warm-up."""

    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    minimum: float = Field(0.0, ge=0, le=1)
    milestones: list[float] = []
    gamma: float = Field(0.1, gt=0)

    def schedule(self, steps_per_epoch: int) -> Schedule:
        """The learning rate as a factor of ``lr``, step by step (one :mod:`fastsparse.core.schedules`
        schedule): a linear warm-up over ``warmup_epochs``, then constant, a cosine from 1 to
        ``minimum`` over the steps after the warm-up, or ``gamma`` per milestone passed."""
        if self.name == "cosine":
            inner: Schedule = Cosine(1.0, half_period=1.0, minimum=self.minimum)
        elif self.name == "step":
            inner = StepDecay(1.0, self.gamma, milestones=tuple(int(math.ceil(m * steps_per_epoch - 1e-9))
                                                                 for m in self.milestones))
        else:
            inner = Constant(1.0)
        warm = int(self.warmup_epochs * steps_per_epoch)
        return Warmup(inner, warm) if warm else inner


class ExperimentConfig(Spec):
    """An experiment file: what to train, on what, how long, and the sparsity block(s)."""

    seed: int = 0
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    lr_schedule: LRScheduleSpec = Field(default_factory=LRScheduleSpec)
    epochs: int = Field(100, ge=1)
    batch_size: int | None = Field(None, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    device: str = "auto"
    # masked: dense weights and masks; sparse: every Linear weight that can trains in compact form;
    # auto: per layer, where a calibration on this machine measures it faster (fastsparse.engine.execution)
    execution: Literal["masked", "sparse", "auto"] = "masked"
    # under torchrun: ddp (every rank a replica) or fsdp (fully_shard: each rank holds a shard of every
    # weight, mask and optimizer state; fastsparse.engine.fsdp)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    sparsity: SparsityField | None = None

    @field_validator("device")
    @classmethod
    def _known_device(cls, v):
        import re
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto (a GPU if there is one; under torchrun the rank's own), cpu, "
                             f"cuda or cuda:N, got {v!r}")
        return v

    @model_validator(mode="after")
    def _batch_size_once(self):
        if self.batch_size is not None:
            given = self.data.model_fields_set
            if "batch_size" in given and self.data.batch_size != self.batch_size:
                raise ValueError(f"batch_size is given twice, as {self.batch_size} and data.batch_size "
                                 f"{self.data.batch_size}; keep one")
            self.data.batch_size = self.batch_size
            self.batch_size = None
        return self


def _field_names(*models: type[BaseModel]) -> set[str]:
    return {name for m in models for name in m.model_fields}


VOCABULARY = sorted(_field_names(ExperimentConfig, SparsityBlock, UpdateSpec, DataSpec, ModelSpec, OptimizerSpec,
                                 LRScheduleSpec))
# the block keys every algorithm gets as they are (when its constructor takes them)
PASSED_AS_IS = ("sparsity", "distribution", "init_method", "update")
# set by the config or the engine, not by a key: filters come from param_filter/exclude globs
RESERVED = {"self", "include", "param_filter", "exclude", "params", "batch"}
EXPERIMENT_ONLY = set(ExperimentConfig.model_fields) - set(SparsityBlock.model_fields)
