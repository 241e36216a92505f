"""Sup-tickets / GraNet command lines (``main_suptickets.py`` for CIFAR, ``main.py`` for ImageNet,
optionally under ``multiproc.py``) as our experiment config.

    convert("python3 main_suptickets.py --sparse --method GraNet ... --model ResNet50 --data cifar100")

Every option either maps to a config key, or to a note (options of the run environment:
workers, ports, log intervals, save paths; and where our behaviour differs in a detail), or
raises :class:`fastsparse.experiments.convert.ConversionError` naming it and what is allowed. Options left
out take the defaults of *their* script (which differ between the CIFAR and ImageNet scripts),
so the config trains what their command trains. The facts come from the scripts' argument
lists; see docs/coming-from/suptickets.md for the table.
"""
from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from . import ConversionError

__all__ = ["convert", "convert_with_notes", "OPTIONS"]

# option -> (kind, aliases); kind: "flag" (no value), "int", "float", "str"
_COMMON = {
    "--sparse": "flag", "--method": "str", "--sparse-init": "str", "--growth": "str", "--prune": "str",
    "--redistribution": "str", "--init-density": "float", "--final-density": "float",
    "--init-prune-epoch": "int", "--final-prune-epoch": "int", "--prune-rate": "float",
    "--update-frequency": "int", "--large-death-rate": "float", "--multiplier": "int", "--fix": "flag",
    "--superposing_method": "str", "--CIMA_factor": "float", "--cyc_lr": "flag", "--cycle": "int",
    "--lr_1": "float", "--lr_2": "float", "--pre_train": "flag", "--cyclic_train": "flag",
    "--re_explore": "flag", "--no_maskupdates": "flag", "--indicate_method": "str", "--seed": "int",
    "--epochs": "int", "--lr": "float", "--momentum": "float", "--workers": "int",
}
OPTIONS: dict[str, dict[str, str]] = {
    "cifar": {**_COMMON, "--batch-size": "int", "--model": "str", "--data": "str", "--decay-schedule": "str",
              "--cycle_rate": "float", "--update_bn": "flag", "--l2": "float", "--optimizer": "str",
              "--pruning-rate": "float", "--valid_split": "float", "--log-interval": "int", "--save": "str",
              "--nolrsche": "flag", "--no-cuda": "flag", "--max-threads": "int", "--test-batch-size": "int"},
    "imagenet": {**_COMMON, "--batch-size": "int", "--arch": "str", "--model-config": "str", "--warmup": "int",
                 "--label-smoothing": "float", "--first_m": "int", "--second_m": "int", "--third_m": "int",
                 "--density": "float", "--cyclic_epochs": "int", "--pretrain_epoch": "int", "--bn_update": "flag",
                 "--weight-decay": "float", "--master_port": "int", "--print-freq": "int", "--save": "str"},
}
_ALIASES = {"-b": "--batch-size", "-j": "--workers", "-p": "--print-freq", "-c": "--model-config", "-a": "--arch",
            "--wd": "--weight-decay", "--learning-rate": "--lr", "-master_port": "--master_port"}

# their scripts' defaults (argparse), per script
_DEFAULTS = {
    "cifar": {"--batch-size": 128, "--epochs": 160, "--lr": 0.1, "--momentum": 0.9, "--seed": 17, "--l2": 5e-4,
              "--data": "mnist", "--model": "vgg-like", "--decay-schedule": "cosine", "--multiplier": 1,
              "--cycle": 8, "--cycle_rate": 0.2, "--lr_1": 0.05, "--lr_2": 0.0001, "--superposing_method": "CAA",
              "--CIMA_factor": 0.5, "--growth": "gradient", "--prune": "magnitude", "--redistribution": "none",
              "--prune-rate": 0.5, "--pruning-rate": 0.5, "--update-frequency": 100, "--sparse-init": "ERK",
              "--method": "GraNet", "--init-density": 0.5, "--final-density": 0.05, "--init-prune-epoch": 0,
              "--final-prune-epoch": 110, "--large-death-rate": 0.8, "--optimizer": "sgd", "--valid_split": 0.1},
    "imagenet": {"--batch-size": 64, "--epochs": 90, "--lr": 0.1, "--momentum": 0.9, "--seed": 17,
                 "--weight-decay": 1e-4, "--arch": "resnet50", "--model-config": "classic", "--warmup": 0,
                 "--label-smoothing": 0.0, "--multiplier": 1, "--cycle": 4, "--lr_1": 0.05, "--lr_2": 0.0001,
                 "--cyclic_epochs": 12, "--pretrain_epoch": 88, "--first_m": 30, "--second_m": 60, "--third_m": 80,
                 "--superposing_method": "CAA", "--CIMA_factor": 0.5, "--growth": "random", "--prune": "magnitude",
                 "--redistribution": "none", "--prune-rate": 0.5, "--density": 0.1, "--sparse-init": "ER",
                 "--update-frequency": 2000, "--init-density": 1.0, "--final-density": 0.2,
                 "--init-prune-epoch": 30, "--final-prune-epoch": 0, "--method": "GraNet",
                 "--large-death-rate": 0.5},
}
# what only names the run or shapes its console: a note, no key
_ENVIRONMENT = {
    "--workers": "data-loading workers: fastsparse holds CIFAR in memory and loads it in the training process",
    "--print-freq": "their console print interval: fastsparse logs every epoch (metrics.jsonl in the run folder)",
    "--log-interval": "their console print interval: fastsparse logs every epoch (metrics.jsonl in the run folder)",
    "--master_port": "torchrun picks the port: pass --master_port to torchrun if you need this one",
    "--save": "their save path: fastsparse writes runs/<algorithm>-<config hash>/ (fastsparse train --out DIR)",
    "--indicate_method": "their save-folder label: fastsparse names the run folder by the config's hash",
    "--no-cuda": "fastsparse trains on the GPU when there is one",
    "--max-threads": "data-loading threads: fastsparse holds the data in memory",
    "--test-batch-size": "fastsparse evaluates with the training batch size",
}
_METHODS = {"GraNet": ("granet", "global"), "GraNet_uniform": ("granet", "local"), "DST": (None, None),
            "GMP": ("gmp", "global"), "GMP_uniform": ("gmp", "local")}
_GROWTH = {"gradient": "rigl", "random": "set", "momentum": "snfs"}
_PRUNE = {"magnitude": "keep_score", "SET": "set", "threshold": "threshold"}
_REDISTRIBUTION = ("none", "momentum", "magnitude", "nonzeros")
_DISTRIBUTION = {"ERK": "erk", "uniform": "uniform", "ER": "er"}
_PRUNE_INITS = {"prune_uniform": ("prune_uniform", None), "prune_global": ("prune_global", None),
                "prune_and_grow_uniform": ("prune_and_grow_uniform", None),
                "prune_and_grow_global": ("prune_and_grow_global", None),
                "prune_structured": ("prune_uniform", "filter"),
                "prune_and_grow_structured": ("prune_and_grow_uniform", "filter")}
_DATASETS = {"cifar100": "cifar100", "cifar10": "cifar10", "mnist": "mnist"}


@dataclass
class _Command:
    script: str                       # "cifar" or "imagenet"
    given: dict[str, Any]
    positional: list[str]
    nproc: int | None = None
    notes: list[str] = field(default_factory=list)

    def get(self, option: str) -> Any:
        return self.given.get(option, _DEFAULTS[self.script].get(option))

    def has(self, option: str) -> bool:
        return option in self.given


def _choice(value: str, allowed, option: str) -> str:
    if value not in allowed:
        raise ConversionError(f"{option} {value!r} has no equivalent; allowed: {', '.join(allowed)}")
    return value


def _parse(text: str) -> _Command:
    """Split the command line; drop the interpreter and scripts; read multiproc's --nproc_per_node."""
    try:
        tokens = shlex.split(text.replace("\\\n", " "))
    except ValueError as e:
        raise ConversionError(f"cannot split the command line: {e}") from None
    notes: list[str] = []
    script, nproc = None, None
    rest: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        bare = re.sub(r"^\$(\{\w+\}|\d)", "", tok)          # $1main.py: their script's folder placeholder
        name = bare.rsplit("/", 1)[-1]
        if i == 0 and re.fullmatch(r"python[\d.]*", name):
            pass
        elif name == "multiproc.py":
            if i + 2 < len(tokens) and tokens[i + 1] == "--nproc_per_node":
                nproc = _number(tokens[i + 2], int, "--nproc_per_node")
                i += 2
        elif name.endswith(".py"):
            if name not in ("main_suptickets.py", "main.py"):
                raise ConversionError(f"unknown script {name!r}; allowed: main_suptickets.py (CIFAR), main.py (ImageNet)")
            script = "cifar" if name == "main_suptickets.py" else "imagenet"
        elif re.fullmatch(r"\$(\{\w+\}|\w+)", tok):
            notes.append(f"{tok}: a shell placeholder of their script, left out; convert the options it stands "
                         f"for as well")
        else:
            rest.append(tok)
        i += 1
    if script is None:
        script = "imagenet" if nproc or any(t in ("--arch", "-a", "--density", "--cyclic_epochs") for t in rest) \
            else "cifar"
    options = OPTIONS[script]
    given: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("-") or re.fullmatch(r"-?\d+(\.\d*)?", tok):
            positional.append(tok)
            i += 1
            continue
        key, eq, value = tok.partition("=")
        if not eq and re.fullmatch(r"-[a-zA-Z]\S+", key) and key[:2] in _ALIASES:   # -j20
            key, value, eq = key[:2], key[2:], "="
        key = _ALIASES.get(key, key)
        if key not in options:
            other = "ImageNet main.py" if script == "cifar" else "CIFAR main_suptickets.py"
            hint = f" (an option of their {other})" if key in OPTIONS["imagenet" if script == "cifar" else "cifar"] \
                else ""
            raise ConversionError(f"unknown option {tok!r}{hint} for their "
                                  f"{'CIFAR main_suptickets.py' if script == 'cifar' else 'ImageNet main.py'}; "
                                  f"allowed: {', '.join(sorted(options))}")
        kind = options[key]
        if kind == "flag":
            if eq:
                raise ConversionError(f"{key} is a flag and takes no value, got {tok!r}")
            given[key] = True
        else:
            if not eq:
                if i + 1 >= len(rest):
                    raise ConversionError(f"{key} needs a value")
                i += 1
                value = rest[i]
            given[key] = _number(value, {"int": int, "float": float}[kind], key) if kind != "str" else value
        i += 1
    return _Command(script, given, positional, nproc, notes)


def _number(value: str, kind: type, option: str):
    try:
        return kind(value)
    except ValueError:
        raise ConversionError(f"{option} needs {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def _fraction(epoch: int, of: int, option: str) -> int | float:
    """An epoch as a fraction of ``of`` epochs (0 stays the step 0)."""
    if epoch == 0:
        return 0
    if not 0 < epoch < of:
        raise ConversionError(f"{option} {epoch} must lie inside the {of} epochs the sparse method trains")
    return round(epoch / of, 6)


def _phases(cmd: _Command) -> tuple[int, dict[str, Any] | None]:
    """(epochs of the base method, the cyclic settings or None)."""
    epochs = cmd.get("--epochs")
    pre, cyc = cmd.has("--pre_train"), cmd.has("--cyclic_train")
    if cyc and not pre:
        raise ConversionError("--cyclic_train without --pre_train continues a model their script trained earlier "
                              "(--resume); fastsparse trains both phases in one run: add --pre_train")
    if not cyc:
        if pre:
            cmd.notes.append("--pre_train without --cyclic_train: plain training of the base method, no tickets")
        else:
            cmd.notes.append("neither --pre_train nor --cyclic_train: converted as plain training of the base method "
                             "over --epochs (GraNet's main.py); their Sup-tickets script would train nothing")
        for flag in ("--cyc_lr", "--re_explore", "--no_maskupdates", "--update_bn", "--bn_update"):
            if cmd.has(flag):
                raise ConversionError(f"{flag} belongs to the cyclic phase, which this command does not run "
                                      f"(no --cyclic_train)")
        return epochs, None
    if not cmd.has("--cyc_lr"):
        raise ConversionError("without --cyc_lr their cyclic phase keeps the last learning rate; fastsparse's cycles "
                              "always use the cyclic rate between --lr_1 and --lr_2: add --cyc_lr")
    if not cmd.has("--no_maskupdates"):
        cmd.notes.append(f"no --no_maskupdates: their base method goes on updating masks every "
                         f"{cmd.get('--update-frequency')} steps during the cycles; in fastsparse the base makes no "
                         f"update in the cyclic phase (masks change there only by re-exploration), as with "
                         f"--no_maskupdates")
    if not (cmd.has("--update_bn") or cmd.has("--bn_update")):
        cmd.notes.append("BN statistics are re-estimated after superposing even without --update_bn/--bn_update "
                         "(fastsparse always does)")
    cycle = cmd.get("--cycle")
    if cmd.script == "imagenet":
        pre_e, cyc_e = cmd.get("--pretrain_epoch"), cmd.get("--cyclic_epochs")
        if pre_e + cyc_e != epochs:
            raise ConversionError(f"--pretrain_epoch {pre_e} + --cyclic_epochs {cyc_e} must equal --epochs {epochs}")
        if cyc_e % cycle:
            raise ConversionError(f"--cyclic_epochs {cyc_e} must be a multiple of --cycle {cycle}")
        rate = round(cyc_e / epochs, 6)
    else:
        rate = cmd.get("--cycle_rate")
    n_cyclic = (int(math.floor(epochs * rate)) // cycle) * cycle
    if n_cyclic < cycle:
        raise ConversionError(f"no whole cycle of {cycle} epochs fits in ⌊{epochs} · {rate}⌋ cyclic epochs")
    method = cmd.get("--superposing_method")
    _choice(method, ("CAA", "CIMA"), "--superposing_method")
    cyclic = {"cycle": cycle, "cycle_rate": rate, "lr_1": cmd.get("--lr_1"), "lr_2": cmd.get("--lr_2"),
              "re_explore": cmd.has("--re_explore"), "explore_rate": cmd.get("--large-death-rate"),
              "superposition": method.lower(), "cima_factor": cmd.get("--CIMA_factor")}
    return epochs - n_cyclic, cyclic


def _target_density(cmd: _Command, method: str) -> float:
    """The density the network ends at (their superposition prunes to it)."""
    final = cmd.get("--final-density")
    if cmd.script == "imagenet":
        density = cmd.get("--density")
        if method == "DST" or density != final:
            final = density
    if method == "DST" and cmd.get("--init-density") != final:
        cmd.notes.append(f"their --method DST trains at --init-density {cmd.get('--init-density')} (it never "
                         f"prunes) and only the superposed network is pruned to density {final}; fastsparse's "
                         f"DST trains at the target density {final} throughout")
    return final


def _decay(cmd: _Command) -> str:
    if cmd.script == "imagenet":
        return "cosine"      # their ImageNet script always decays the prune rate by a cosine
    return _choice(cmd.get("--decay-schedule"), ("cosine", "constant"), "--decay-schedule")


def _base_block(cmd: _Command, base_epochs: int) -> tuple[str, dict[str, Any]]:
    """(algorithm, its settings) for --method and its options."""
    method = _choice(cmd.get("--method"), tuple(_METHODS), "--method")
    growth = _choice(cmd.get("--growth"), tuple(_GROWTH), "--growth")
    prune = _choice(cmd.get("--prune"), tuple(_PRUNE), "--prune")
    redistribution = _choice(cmd.get("--redistribution"), _REDISTRIBUTION, "--redistribution")
    prune_rate = cmd.get("--prune-rate")
    decay = _decay(cmd)
    multiplier = cmd.get("--multiplier")
    if method == "DST":
        for option in ("--init-prune-epoch", "--final-prune-epoch"):
            if cmd.has(option):
                cmd.notes.append(f"{option} is unused by --method DST (as in their code)")
        settings: dict[str, Any] = {"keep_score": "magnitude"} if prune == "magnitude" else \
            {"drop_rule": _PRUNE[prune]}
        settings["redistribution"] = redistribution
        settings["update"] = {"freq": cmd.get("--update-frequency")}
        settings["drop_fraction"] = ({"type": "cosine", "init": prune_rate, "half_period": 1.0, "minimum": 0.005}
                                     if decay == "cosine" else {"type": "constant", "value": prune_rate})
        return _GROWTH[growth], settings
    name, scope = _METHODS[method]
    if name == "granet":
        for option, value, ours in (("--growth", growth, "gradient"), ("--prune", prune, "magnitude"),
                                    ("--redistribution", redistribution, "none")):
            if value != ours:
                raise ConversionError(f"{option} {value} has no equivalent for --method {method}: GraNet here drops by "
                                      f"magnitude and regrows by gradient in each layer; allowed: {option} {ours}, "
                                      f"or --method DST")
    start = _fraction(cmd.get("--init-prune-epoch") * multiplier, base_epochs, "--init-prune-epoch")
    end = _fraction(cmd.get("--final-prune-epoch") * multiplier, base_epochs, "--final-prune-epoch")
    init_density = 1.0 if cmd.get("--sparse-init") == "GMP" else cmd.get("--init-density")
    settings = {"initial_sparsity": round(1.0 - init_density, 6), "scope": scope, "start": start, "end": end,
                "freq": cmd.get("--update-frequency")}
    if name == "granet":
        settings.update(regrow_fraction=prune_rate, regrow_min=0.005 if decay == "cosine" else prune_rate,
                        keep_regrowing=True)
        if cmd.has("--large-death-rate") and not cmd.has("--cyclic_train"):
            raise ConversionError("--large-death-rate is the drop rate of the re-exploration at each cycle start; "
                                  "this command runs no cycles (no --cyclic_train)")
    if scope == "local":
        cmd.notes.append(f"--method {method}: their uniform pruning keeps the classifier at density 0.2 once the "
                         f"sparsity passes 0.8; fastsparse prunes every layer to the same density")
    return name, settings


def _data_and_model(cmd: _Command) -> tuple[dict[str, Any], dict[str, Any]]:
    if cmd.script == "cifar":
        if cmd.positional:
            raise ConversionError(f"unexpected argument(s) {cmd.positional} for their CIFAR main_suptickets.py")
        data_name = _choice(cmd.get("--data"), tuple(_DATASETS), "--data")
        model = _choice(cmd.get("--model"), ("ResNet50",), "--model")
        cmd.notes.append(f"their CIFAR script trains on {1 - cmd.get('--valid_split'):.0%} of the training set "
                         f"(--valid_split {cmd.get('--valid_split')}); fastsparse trains on all of it and evaluates "
                         f"on the test set")
        data = {"name": _DATASETS[data_name], "root": f"data/{data_name}", "batch_size": cmd.get("--batch-size")}
        return data, {"name": model.lower(), "stem": "cifar"}
    if len(cmd.positional) != 1:
        raise ConversionError(f"their ImageNet main.py takes one data folder (with train/ and val/), "
                              f"got {cmd.positional or 'none'}")
    arch = _choice(cmd.get("--arch"), ("resnet50",), "--arch")
    config = _choice(cmd.get("--model-config"), ("classic", "fanin"), "-c/--model-config")
    data = {"name": "imagefolder", "root": cmd.positional[0], "image_size": 224, "batch_size": cmd.get("--batch-size")}
    if cmd.has("--workers"):
        data["workers"] = cmd.get("--workers")
    cmd.notes.append("data: images are decoded on the fly by data.workers DataLoader processes per rank (their -j), "
                     "with the random-resized-crop and flip of their training and the resize-256/centre-crop-224 of "
                     "their evaluation (fastsparse.experiments.imagefolder)")
    return data, {"name": arch, "stem": "imagenet", "conv_init": "fan_in" if config == "fanin" else "fan_out"}


def _optimizer_and_schedule(cmd: _Command, base_epochs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    lr, momentum = cmd.get("--lr"), cmd.get("--momentum")
    if cmd.script == "cifar":
        name = _choice(cmd.get("--optimizer"), ("sgd", "adam"), "--optimizer")
        optimizer = {"name": name, "lr": lr, "weight_decay": cmd.get("--l2")}
        if name == "sgd":
            optimizer["momentum"] = momentum
        if cmd.has("--nolrsche"):
            return optimizer, {"name": "constant"}
        return optimizer, {"name": "step", "milestones": [int(0.5 * base_epochs), int(0.75 * base_epochs)],
                           "gamma": 0.1}
    optimizer = {"name": "sgd", "lr": lr, "momentum": momentum, "weight_decay": cmd.get("--weight-decay")}
    cmd.notes.append("weight decay: their ImageNet script exempts BatchNorm parameters; fastsparse applies it to all")
    m = cmd.get("--multiplier")
    schedule: dict[str, Any] = {"name": "step", "milestones": [cmd.get(k) * m for k in ("--first_m", "--second_m",
                                                                                        "--third_m")], "gamma": 0.1}
    if cmd.get("--warmup"):
        schedule["warmup_epochs"] = cmd.get("--warmup")
        cmd.notes.append("warm-up: theirs raises the learning rate per epoch (lr · (e + 1)/(warmup + 1)), ours "
                         "linearly per step")
    return optimizer, schedule


def convert_with_notes(text: str) -> tuple[dict[str, Any], list[str]]:
    """(our experiment config, notes) for their command line; see the module docstring."""
    cmd = _parse(text)
    for option, note in _ENVIRONMENT.items():
        if cmd.has(option) and not (option == "--workers" and cmd.script == "imagenet"):   # data.workers there
            cmd.notes.append(f"{option} {cmd.given[option]}: {note}".replace(" True:", ":"))
    if cmd.nproc:
        cmd.notes.append(f"multiproc.py --nproc_per_node {cmd.nproc}: launch with torchrun --nproc_per_node "
                         f"{cmd.nproc} -m fastsparse train <this file>; data.batch_size is their -b, per process")
    if cmd.has("--multiplier") and cmd.get("--multiplier") != 1:
        cmd.notes.append(f"--multiplier {cmd.get('--multiplier')} stretches their pruning epochs"
                         + (" and learning-rate milestones" if cmd.script == "imagenet" else "")
                         + ", which are scaled here")
    data, model = _data_and_model(cmd)
    base_epochs, cyclic = _phases(cmd)
    optimizer, schedule = _optimizer_and_schedule(cmd, base_epochs)
    config: dict[str, Any] = {"seed": cmd.get("--seed"), "data": data, "model": model, "optimizer": optimizer,
                              "lr_schedule": schedule, "epochs": cmd.get("--epochs") if cyclic else base_epochs}
    if cmd.script == "imagenet":
        config["label_smoothing"] = cmd.get("--label-smoothing")
    if cmd.has("--pruning-rate") and not cmd.get("--sparse-init").startswith("prune"):
        raise ConversionError("--pruning-rate is the fraction removed by the --sparse-init prune_* forms; this "
                              f"command uses --sparse-init {cmd.get('--sparse-init')}")
    if not cmd.has("--sparse"):
        if cyclic:
            raise ConversionError("Sup-tickets superposes sparse tickets: add --sparse")
        cmd.notes.append("no --sparse: dense training, no sparsity block")
        return config, cmd.notes
    sparse_init = _choice(cmd.get("--sparse-init"), tuple(_DISTRIBUTION) + ("GMP",) + tuple(_PRUNE_INITS),
                          "--sparse-init")
    if sparse_init in _PRUNE_INITS:
        if cyclic or not cmd.has("--fix"):
            raise ConversionError(f"--sparse-init {sparse_init} prunes the weights the model starts from, once; in "
                                  f"fastsparse that is the algorithm {_PRUNE_INITS[sparse_init][0]}, whose masks stay "
                                  f"fixed: add --fix (and no --cyclic_train), or use --sparse-init ERK or uniform")
        name, granularity = _PRUNE_INITS[sparse_init]
        block: dict[str, Any] = {"algorithm": name, "sparsity": cmd.get("--pruning-rate")}
        if granularity:
            block["granularity"] = granularity
            cmd.notes.append(f"--sparse-init {sparse_init}: listed in their README but not in their released code; "
                             f"here whole output filters are pruned by their mean |w|")
        config["sparsity"] = block
        return config, cmd.notes
    method = cmd.get("--method")
    if sparse_init == "GMP" and _choice(method, tuple(_METHODS), "--method") == "DST":
        raise ConversionError("--sparse-init GMP starts dense, which only gradual pruning (--method GMP, GMP_uniform, "
                              "GraNet, GraNet_uniform) can end sparse")
    algorithm, settings = _base_block(cmd, base_epochs)
    if cmd.has("--fix"):
        raise ConversionError(f"--fix freezes the masks of --method {method}; for fixed masks use --sparse-init with "
                              f"a prune_* form, or convert without --fix")
    density = _target_density(cmd, method)
    common = {"sparsity": round(1.0 - density, 6)}
    if sparse_init != "GMP":
        common["distribution"] = _DISTRIBUTION[sparse_init]
    if cyclic is None:
        config["sparsity"] = {"algorithm": algorithm, **common, **settings}
    else:
        config["sparsity"] = {"algorithm": "suptickets", **common, "base": algorithm, "base_kwargs": settings,
                              **cyclic}
    return config, cmd.notes


def convert(text: str) -> dict[str, Any]:
    """Our experiment config for their command line (notes: :func:`convert_with_notes`)."""
    return convert_with_notes(text)[0]
