"""Tables and plots of finished runs: ``report.md`` and PNG figures (matplotlib, Agg backend).

:func:`write_report` reads every run folder below a directory (``summary.json``,
``metrics.jsonl``, ``updates.jsonl``), groups the runs by method and sparsity, and writes:

- ``report.md``: mean ± std test accuracy over seeds, actual sparsity, training FLOPs and
  wall time relative to dense, and the figures;
- ``accuracy.png``: test accuracy per epoch, one panel per sparsity;
- ``density.png``: final density of each layer per method;
- ``mask_updates.png``: fraction of the mask changed at each update, and the in-time
  over-parameterisation (ITOP) rate: the share of weights ever active;
- ``accuracy_vs_flops.png``: final accuracy against training FLOPs.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["Run", "load_runs", "write_report", "summarize"]

_ORDER = ["dense", "static", "set", "snfs", "rigl"]


@dataclass
class Run:
    """One finished run: its summary, per-epoch metrics and mask-update records."""

    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.summary.get("method", "?")

    @property
    def level(self) -> float:
        """The sparsity the config asked for (0 for dense): the grouping key."""
        block = self.summary.get("config", {}).get("sparsity")
        if isinstance(block, dict):
            s = block.get("sparsity")
            if isinstance(s, (int, float)):
                return round(float(s), 4)
            if isinstance(s, dict):
                for key in ("final", "value", "init", "high"):
                    if isinstance(s.get(key), (int, float)):
                        return round(float(s[key]), 4)
        return round(float(self.summary.get("target_sparsity", 0.0)), 4)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a torn last line of a killed run
    return rows


def load_runs(path: str | Path) -> list[Run]:
    """Every finished run (a folder holding ``summary.json``) at or below ``path``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such folder: {path}")
    files = [path / "summary.json"] if (path / "summary.json").is_file() else sorted(path.rglob("summary.json"))
    runs = []
    for f in files:
        try:
            summary = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        runs.append(Run(f.parent, summary, _read_jsonl(f.parent / "metrics.jsonl"),
                        _read_jsonl(f.parent / "updates.jsonl")))
    return runs


def _method_key(method: str) -> tuple[int, str]:
    return (_ORDER.index(method) if method in _ORDER else len(_ORDER), method)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def setup_of(run: Run) -> str:
    """What a run trained on, apart from the method: data, model, epochs (the report's sections)."""
    return _subtitle([run]).split(";")[0]


def by_setup(runs: Sequence[Run]) -> list[list[Run]]:
    """The runs grouped by :func:`setup_of`, the largest group first (it gets the figures)."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        groups[setup_of(r)].append(r)
    return sorted(groups.values(), key=len, reverse=True)


def summarize(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per (method, sparsity): mean/std accuracy, actual sparsity, FLOPs and time vs dense
    (the dense runs of the same setup: pass the runs of one setup, see :func:`by_setup`)."""
    groups: dict[tuple[str, float], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.method, r.level)].append(r)
    dense = [r for r in runs if r.method == "dense"]
    dense_time = statistics.fmean(r.summary["train_seconds"] for r in dense) if dense else None
    rows = []
    for (method, level), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], _method_key(kv[0][0]))):
        acc, acc_std = _mean_std([r.summary["test_accuracy"] for r in rs])
        seconds = statistics.fmean(r.summary["train_seconds"] for r in rs)
        flops = statistics.fmean(r.summary["sparse_flops"] / r.summary["dense_equivalent_flops"] for r in rs)
        rows.append({
            "method": method, "level": level, "runs": len(rs), "accuracy": acc, "accuracy_std": acc_std,
            "sparsity": statistics.fmean(r.summary["sparsity"] for r in rs), "flops": flops,
            "seconds": seconds, "time": seconds / dense_time if dense_time else math.nan,
            "itop": statistics.fmean(r.summary.get("itop_rate", 1.0) for r in rs),
        })
    return rows


# --- figures --------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_LINESTYLES = ("-", "--", "-.", ":")


def _styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A fixed look per method: dense black and dashed; the others take the tab10 colours, then
    Dark2's, and from the eleventh on a dashed line style too, so that many methods stay apart."""
    plt = _plt()
    palette = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors)
    others = [m for m in sorted(set(methods), key=_method_key) if m != "dense"]
    styles = {m: {"color": palette[i % len(palette)], "ls": _LINESTYLES[(i // 10) % 4]} for i, m in enumerate(others)}
    styles["dense"] = {"color": "black", "ls": (0, (4, 2)), "marker": "o"}
    return styles


def _levels(runs: Sequence[Run]) -> list[float]:
    return sorted({r.level for r in runs if r.method != "dense"}) or [0.0]


def _by_method(runs: Sequence[Run], level: float) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        if r.level == level or r.method == "dense":
            out[r.method].append(r)
    return dict(sorted(out.items(), key=lambda kv: _method_key(kv[0])))


def _curve(runs: Sequence[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    """Epochs, mean and std of ``key`` over the runs (up to the shortest run)."""
    n = min(len(r.metrics) for r in runs)
    epochs = [runs[0].metrics[i]["epoch"] for i in range(n)]
    stats = [_mean_std([r.metrics[i][key] for r in runs]) for i in range(n)]
    return epochs, [m for m, _ in stats], [s for _, s in stats]


def _subtitle(runs: Sequence[Run], stat: str = "mean ± std") -> str:
    cfg = runs[0].summary.get("config", {})
    model = cfg.get("model", {})
    sizes = model.get("sizes")
    model_name = f"MLP {'-'.join(map(str, sizes))}" if model.get("name") == "mlp" and sizes else model.get("name", "?")
    seeds = len({r.summary.get("seed") for r in runs})
    return (f"{cfg.get('data', {}).get('name', '?')}, {model_name}, {cfg.get('epochs', '?')} epochs; "
            f"{stat} over {seeds} seed{'s' if seeds != 1 else ''}")


def _plain_log_axis(axis) -> None:
    """Log-scale tick labels as plain numbers (0.1, 1, 10, 100) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _level_title(level: float) -> str:
    return f"{100 * level:g}% sparse" if level else "dense"


def _figure(n_cols: int, n_rows: int = 1, height: float = 4.6):
    plt = _plt()
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5.6 * n_cols + 1.8, height * n_rows), squeeze=False,
                             layout="constrained")
    return plt, fig, axes


def _legend(fig, styles: dict[str, dict[str, Any]], methods: Sequence[str], title: str = "method") -> None:
    """One legend for the whole figure, outside the panels on the right."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=styles[m]["color"], ls=styles[m]["ls"], lw=2) for m in methods]
    fig.legend(handles, list(methods), loc="outside right center", fontsize=9, title=title, title_fontsize=9)


def plot_accuracy(runs: Sequence[Run], path: Path) -> None:
    """Top row: the whole of training, 0-100%. Bottom row: a zoom on the upper band of the final
    accuracies, where most methods end and their differences are small."""
    levels = _levels(runs)
    styles = _styles([r.method for r in runs])
    plt, fig, axes = _figure(len(levels), 2, height=4.0)
    shown: list[str] = []
    for col, level in enumerate(levels):
        finals = []
        for method, rs in _by_method(runs, level).items():
            rs = [r for r in rs if r.metrics]
            if not rs:
                continue
            epochs, mean, std = _curve(rs, "test_accuracy")
            mean_pct, std_pct = [100 * m for m in mean], [100 * s for s in std]
            finals.append(mean_pct[-1])
            st = styles[method]
            for ax in (axes[0][col], axes[1][col]):
                ax.plot(epochs, mean_pct, color=st["color"], ls=st["ls"], lw=1.6)
                ax.fill_between(epochs, [m - s for m, s in zip(mean_pct, std_pct)],
                                [m + s for m, s in zip(mean_pct, std_pct)], color=st["color"], alpha=0.12, lw=0)
            if method not in shown:
                shown.append(method)
        top, zoom = axes[0][col], axes[1][col]
        top.set_title(f"{_level_title(level)}: whole range")
        top.set_ylim(0, 100)
        best = max(finals, default=100.0)
        low = min((f for f in finals if f >= best - 10), default=best)   # methods within 10 points of the best
        zoom.set_ylim(max(0.0, math.floor(low - 1)), min(100.0, math.ceil(best + 1)))
        zoom.set_title(f"{_level_title(level)}: zoom on the 10 points below the best")
        for ax in (top, zoom):
            ax.set_xlabel("epoch")
            ax.set_ylabel("test accuracy (%)")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
    _legend(fig, styles, sorted(shown, key=_method_key))
    fig.suptitle(f"Test accuracy per epoch ({_subtitle(runs)})")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_density(runs: Sequence[Run], path: Path) -> None:
    levels = _levels(runs)
    styles = _styles([r.method for r in runs])
    plt, fig, axes = _figure(len(levels))
    shown: list[str] = []
    for ax, level in zip(axes[0], levels):
        groups = {m: rs for m, rs in _by_method(runs, level).items() if m != "dense"}
        if not groups:
            continue
        first = next(iter(groups.values()))[0]
        layers = list(first.summary["density_per_layer"])
        width = 0.85 / len(groups)
        for j, (method, rs) in enumerate(groups.items()):
            values = [100 * statistics.fmean(r.summary["density_per_layer"].get(n, math.nan) for r in rs)
                      for n in layers]
            xs = [i + (j - (len(groups) - 1) / 2) * width for i in range(len(layers))]
            ax.bar(xs, values, width, color=styles[method]["color"],
                   hatch="//" if styles[method]["ls"] != "-" else None, edgecolor="white", lw=0.3)
            if method not in shown:
                shown.append(method)
        shapes = _layer_shapes(first)
        ax.set_xticks(range(len(layers)), [f"{n}\n{shapes.get(n, '')}" for n in layers], fontsize=8)
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        ax.axhline(100 * (1 - level), color="grey", ls=":", lw=1)
        ax.set_title(f"{_level_title(level)} (dotted: overall density {100 - 100 * level:g}%)")
        ax.set_xlabel("layer (weight shape)")
        ax.set_ylabel("final density (% of weights active, log scale)")
        ax.grid(axis="y", alpha=0.3, which="both")
    from matplotlib.patches import Patch

    ordered = sorted(shown, key=_method_key)
    fig.legend([Patch(facecolor=styles[m]["color"], edgecolor="white", hatch="//" if styles[m]["ls"] != "-" else None)
                for m in ordered],
               ordered, loc="outside right center", fontsize=9, title="method", title_fontsize=9)
    fig.suptitle(f"Density per layer at the end of training ({_subtitle(runs, 'mean')})")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _layer_shapes(run: Run) -> dict[str, str]:
    """Layer shapes from the model state saved with the run (empty if unreadable)."""
    try:
        import torch

        state = torch.load(run.path / "model.pt", map_location="cpu", weights_only=True)
    except Exception:  # a report of runs without weights still draws, without shapes
        return {}
    return {k: "×".join(map(str, v.shape)) for k, v in state.items() if hasattr(v, "shape")}


def plot_mask_updates(runs: Sequence[Run], path: Path) -> bool:
    """Top: the fraction of active weights regrown at each mask update (methods that regrow).
    Bottom: the ITOP rate, the share of the sparse layers' weights ever active, per epoch.
    Returns False (and draws nothing) when no run regrew weights."""
    regrowing = {r.method for r in runs if any(u.get("changed", 0) for u in r.updates)}
    if not regrowing:
        return False
    levels = _levels(runs)
    styles = _styles([r.method for r in runs])
    plt, fig, axes = _figure(len(levels), 2, height=4.0)
    shown: list[str] = []
    for col, level in enumerate(levels):
        ax_c, ax_i = axes[0][col], axes[1][col]
        for method, rs in _by_method(runs, level).items():
            if method == "dense":
                continue
            st = styles[method]
            with_updates = [r for r in rs if r.updates]
            if method in regrowing and with_updates:
                n = min(len(r.updates) for r in with_updates)
                steps = [with_updates[0].updates[i]["step"] for i in range(n)]
                frac = [100 * statistics.fmean(r.updates[i]["changed_fraction"] for r in with_updates)
                        for i in range(n)]
                ax_c.plot(steps, frac, color=st["color"], ls=st["ls"], marker=".", ms=4, lw=1.5)
            rs = [r for r in rs if r.metrics and "itop_rate" in r.metrics[0]]
            if rs:
                epochs, mean, _ = _curve(rs, "itop_rate")
                ax_i.plot(epochs, [100 * m for m in mean], color=st["color"], ls=st["ls"], lw=1.5)
                if method not in shown:
                    shown.append(method)
        ax_c.set_title(f"{_level_title(level)}: weights regrown at each mask update")
        ax_c.set_xlabel("training step")
        ax_c.set_ylabel("regrown (% of active weights)")
        ax_c.grid(alpha=0.3)
        ax_i.set_title(f"{_level_title(level)}: exploration (ITOP rate)")
        ax_i.set_xlabel("epoch")
        ax_i.set_ylabel("ever active (% of sparse weights)")
        ax_i.set_yscale("log")
        _plain_log_axis(ax_i.yaxis)
        ax_i.xaxis.get_major_locator().set_params(integer=True)
        ax_i.grid(alpha=0.3, which="both")
    _legend(fig, styles, sorted(shown, key=_method_key))
    fig.suptitle(f"Mask updates ({_subtitle(runs, 'mean')})")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_accuracy_vs_flops(rows: Sequence[dict[str, Any]], runs: Sequence[Run], path: Path) -> None:
    styles = _styles([r["method"] for r in rows])
    levels = sorted({r["level"] for r in rows if r["level"]})
    markers = {level: m for level, m in zip(levels, "s^DvP<>p")}
    markers[0.0] = "o"
    plt, fig, axes = _figure(1, height=5.0)
    ax = axes[0][0]
    for r in rows:
        ax.errorbar(r["flops"], 100 * r["accuracy"], yerr=100 * r["accuracy_std"], fmt=markers[r["level"]],
                    color=styles[r["method"]]["color"], ms=7, capsize=3, mec="black", mew=0.4)
    from matplotlib.lines import Line2D

    methods = sorted({r["method"] for r in rows}, key=_method_key)
    handles = [Line2D([], [], ls="", marker="o", color=styles[m]["color"], mec="black", mew=0.4) for m in methods]
    handles += [Line2D([], [], ls="", marker=markers[lv], color="grey") for lv in levels]
    fig.legend(handles, methods + [_level_title(lv) for lv in levels], loc="outside right center", fontsize=9)
    ax.set_xscale("log")
    _plain_log_axis(ax.xaxis)
    ax.set_xlabel("training FLOPs (fraction of dense, log scale)")
    ax.set_ylabel("final test accuracy (%)")
    fig.suptitle(f"Accuracy against training cost\n({_subtitle(runs)})", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- report.md --------------------------------------------------------------------------------------
def _pct(x: float, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def _table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], bool]:
    """The markdown table of :func:`summarize`'s rows, and whether a run missed its target."""
    lines = ["| method | target sparsity | test accuracy (mean ± std) | actual sparsity | training FLOPs (× dense) "
             "| wall time (× dense) | runs |", "|---|---|---|---|---|---|---|"]
    missed = False
    for r in rows:
        time_ratio = "–" if math.isnan(r["time"]) else f"{r['time']:.2f}"
        accuracy = f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}%"
        mark = " †" if abs(r["sparsity"] - r["level"]) > 0.01 else ""
        missed = missed or bool(mark)
        lines.append(f"| {r['method']}{mark} | {_pct(r['level'], 0)} | {accuracy} | {_pct(r['sparsity'], 2)} | "
                     f"{r['flops']:.3f} | {time_ratio} | {r['runs']} |")
    return lines, missed


def _section_note(runs: Sequence[Run]) -> list[str]:
    if not any("execution" in r.summary for r in runs):
        return []
    return ["Rows marked *sparse execution* train their Linear weights as their active values only (see "
            "docs/sparse-execution.md in the repository); the others are masked. Wall time is relative to dense "
            "training of this model.", ""]


def write_report(path: str | Path, out: str | Path | None = None, skipped: dict[str, str] | None = None,
                 command: str | None = None) -> Path:
    """Read the runs below ``path`` and write ``report.md`` and the figures into ``out`` (default ``path``)."""
    runs = load_runs(path)
    if not runs:
        raise FileNotFoundError(f"no finished run (a folder with summary.json) in {path}")
    out = Path(out or path)
    out.mkdir(parents=True, exist_ok=True)
    runs, *others = by_setup(runs)   # the figures show the main setup; every setup gets its table
    rows = summarize(runs)
    plot_accuracy(runs, out / "accuracy.png")
    plot_density(runs, out / "density.png")
    has_updates = plot_mask_updates(runs, out / "mask_updates.png")
    plot_accuracy_vs_flops(rows, runs, out / "accuracy_vs_flops.png")
    lines = ["# fastsparse comparison", "", f"{_subtitle(runs)}.", ""]
    if command:
        lines += [f"Reproduce with `{command}`.", ""]
    table, missed = _table(rows)
    lines += table
    if missed:
        lines += ["", "† the actual sparsity at the end of training is more than 1 point away from the target."]
    lines += [
        "",
        "Training FLOPs are counted as in the RigL paper (Evci et al. 2020, appendix H): 3·f_S per example for "
        "static sparse training, SET and the other methods (f_S the sparse forward FLOPs, averaged over training), "
        "2·f_S + f_D for SNFS (dense gradients every step), and 3·f_S plus (f_D − f_S) at each mask update for "
        "RigL; dense is 3·f_D. Wall time is the training time of one run, relative to dense; runs share the "
        "machine's cores, so it is indicative only.",
        "",
        "![test accuracy per epoch](accuracy.png)", "",
        "![density per layer](density.png)", "",
    ]
    if has_updates:
        lines += ["![mask updates and exploration](mask_updates.png)", ""]
    lines += ["![accuracy against training FLOPs](accuracy_vs_flops.png)", ""]
    for group in others:
        table, missed_here = _table(summarize(group))
        lines += [f"## {_subtitle(group)}", "", *_section_note(group), *table, ""]
        if missed_here:
            lines += ["† the actual sparsity at the end of training is more than 1 point away from the target.", ""]
    if skipped:
        lines += ["## Not in this comparison", ""] + [f"- `{m}`: {why}" for m, why in sorted(skipped.items())] + [""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
