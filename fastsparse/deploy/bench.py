"""``fastsparse bench-inference``: dense against CSR inference of a compressed file's layers, timed."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .export import load_sparse, read_sparse
from .inference import LayerDecision, _strip_enforcement, measure, plan_inference, to_inference
from .modules import SEMI_STRUCTURED_CPU_NOTE, _dense_linear
from .size import build_model

__all__ = ["InferenceBench", "bench_inference", "bench_inference_command"]


@dataclass
class InferenceBench:
    """Per-layer and end-to-end latencies (seconds) of the dense model and its converted copy."""

    batches: list[int]
    layers: list[LayerDecision]
    end_to_end: dict[int, tuple[float, float]]   # batch -> (dense s, converted s); empty when not measurable
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"threads: {torch.get_num_threads()}; latencies are medians of interleaved runs"]
        head = f"{'layer':<28} {'shape':<14} {'sparsity':>8} {'batch':>6} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8}  used"
        lines += ["per layer (sparse = the CSR module, timed whether used or not):", head, "-" * len(head)]
        for d in self.layers:
            shape = f"{d.shape[0]}x{d.shape[1]}"
            if not d.timings:
                lines.append(f"{d.name:<28} {shape:<14} {d.sparsity:>8.1%} {'-':>6} {'-':>10} {'-':>10} {'-':>8}  "
                             f"{d.use} ({d.reason})")
            for b in sorted(d.timings):
                dense, sparse = d.timings[b]
                lines.append(f"{d.name:<28} {shape:<14} {d.sparsity:>8.1%} {b:>6} {dense * 1e3:>10.3f} "
                             f"{sparse * 1e3:>10.3f} {dense / sparse:>7.2f}x  {d.use}")
        if self.end_to_end:
            lines += ["end to end (dense model vs converted model):",
                      f"{'batch':>6} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8}"]
            for b, (dense, sparse) in sorted(self.end_to_end.items()):
                lines.append(f"{b:>6} {dense * 1e3:>10.3f} {sparse * 1e3:>10.3f} {dense / sparse:>7.2f}x")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class _LayerBank(nn.Module):
    """Stored sparse Linear weights as independent layers (when no model can be rebuilt)."""

    def __init__(self, layers: dict[str, nn.Linear]):
        super().__init__()
        self.layers = nn.ModuleDict({f"l{i}": lin for i, lin in enumerate(layers.values())})
        self.display = dict(zip(self.layers.keys(), layers.keys()))


def _model_from_file(path: str) -> tuple[nn.Module, Callable[[int], Tensor] | None, list[str]]:
    sf = read_sparse(path)
    model = build_model(sf.model_spec)
    if model is not None:
        load_sparse(path, model)
        n_in = sf.model_spec["sizes"][0]
        return model, (lambda b: torch.randn(b, n_in, generator=torch.Generator().manual_seed(b))), \
            [f"model rebuilt from the file's spec {sf.model_spec}"]
    layers = {}
    state = sf.state_dict
    for name in sf.masks:
        w = state[name]
        if w.dim() != 2 or not w.is_floating_point():
            continue
        bias_name = name[: -len("weight")] + "bias" if name.endswith("weight") else None
        b = state.get(bias_name) if bias_name else None
        if b is not None and tuple(b.shape) != (w.shape[0],):
            b = None
        layers[name] = _dense_linear(w, b)
    if not layers:
        raise ValueError(f"{path} has no model spec and no 2-D sparse weight to benchmark")
    return _LayerBank(layers), None, ["no model spec in the file: each sparse 2-D weight is benchmarked "
                                      "as a Linear layer of its own; no end-to-end figure"]


def _default_input(model: nn.Module) -> Callable[[int], Tensor] | None:
    """A batch maker for models that start with a Linear layer (MLP-like Sequentials)."""
    if isinstance(model, nn.Sequential) and len(model) and isinstance(model[0], nn.Linear):
        first = model[0]
        return lambda b: torch.randn(b, first.in_features, generator=torch.Generator().manual_seed(b),
                                     dtype=first.weight.dtype).to(first.weight.device)
    return None


def bench_inference(
    model_or_file: nn.Module | str | os.PathLike,
    batches: Sequence[int] = (1, 16, 128),
    *,
    example_input: Callable[[int], Any] | None = None,
    reps: int = 5,
    min_speedup: float = 1.1,
) -> InferenceBench:
    """Dense vs sparse latency per layer (every Linear and attention projection, timed at
    each batch size) and end to end (the model against ``to_inference`` of it).

    ``model_or_file`` is a model or a file written by :func:`fastsparse.deploy.export.save_sparse`.
    End-to-end timing needs ``example_input(batch)`` (a tensor or a tuple of arguments);
    it is inferred for Sequentials that start with a Linear layer and for files holding
    an MLP spec.
    """
    notes = []
    if isinstance(model_or_file, (str, os.PathLike)):
        model, file_input, notes = _model_from_file(os.fspath(model_or_file))
        example_input = example_input or file_input
    else:
        model = model_or_file
    dense = copy.deepcopy(model).eval()
    _strip_enforcement(dense)
    plan = plan_inference(dense, batches, min_speedup=min_speedup, min_sparsity=0.0, reps=reps)
    if isinstance(dense, _LayerBank):
        for d in plan:
            d.name = dense.display.get(d.name.removeprefix("layers."), d.name)
    converted = to_inference(dense, plan=plan)
    if example_input is None:
        example_input = _default_input(dense)
    e2e = {}
    if example_input is not None:
        for b in sorted({int(x) for x in batches}):
            args = example_input(b)
            args = args if isinstance(args, tuple) else (args,)
            device = next(dense.parameters()).device
            t = measure({"dense": lambda a=args: dense(*a), "sparse": lambda a=args: converted(*a)},
                        reps, device=device)
            e2e[b] = (t["dense"], t["sparse"])
    elif not isinstance(dense, _LayerBank):
        notes.append("no example_input: end-to-end latency not measured")
    devices = {p.device.type for p in dense.parameters()}
    if "cuda" not in devices:
        notes.append(SEMI_STRUCTURED_CPU_NOTE)
    return InferenceBench(sorted({int(x) for x in batches}), plan, e2e, notes)


def bench_inference_command(file: str, batches: Iterable[int] = (1, 16, 128)) -> str:
    """``fastsparse bench-inference FILE --batch 1,16,128``: the printed benchmark."""
    batches = [int(b) for b in batches]
    result = bench_inference(file, batches)
    return f"{file}: dense vs sparse (CSR) inference\n{result}"
