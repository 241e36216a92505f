"""Rare Gems (GEM-MINER) YAML configs → our experiment file.

Their config describes one run: a score search (``algo``: ``hc``/``hc_iter`` GEM-MINER, ``ep``
edge-popup) for ``epochs`` epochs, then fine-tuning at ``fine_tune_lr`` for as many epochs.
``target_sparsity`` there is the *percent of weights kept* (0.59 → 0.59% kept); our
``sparsity`` is the fraction removed, so it becomes 1 − target_sparsity / 100.

Every key of their sample config maps to one of ours, is a setting of the run environment
(``workers``, ``name``: kept as notes), or fixes a choice that is the only one we implement
(``conv_type: SubnetConv``, ``bn_type: NonAffineBatchNorm``, ``freeze_weights: True``,
``prune_type: BottomK``, ``round: naive``); another value of those raises
:class:`~fastsparse.experiments.convert.ConversionError` saying what is allowed.
"""
from __future__ import annotations

from typing import Any

from . import ConversionError

__all__ = ["convert", "convert_with_notes", "KEYS"]

_ALGOS = {"hc": ("gem", {"algo": "hc"}), "hc_iter": ("gem", {"algo": "hc_iter"}),
          "ep": ("edge_popup", {}), "global_ep": ("edge_popup", {"scope": "global"})}
_DATASETS = {"cifar10": ({"name": "cifar10", "root": "data/cifar10"}, "resnet20"),
             "cifar100": ({"name": "cifar100", "root": "data/cifar100"}, "resnet20"),
             "mnist": ({"name": "mnist", "root": "data/mnist"}, "lenet300"),
             "imagenet": ({"name": "imagefolder", "root": "data/imagenet", "image_size": 224}, "resnet50"),
             "tinyimagenet": ({"name": "imagefolder", "root": "data/tiny-imagenet-200", "image_size": 64},
                              "resnet18")}
_POLICIES = {"cosine_lr": "cosine", "constant_lr": "constant", "multistep_lr": "step"}
_WEIGHT_INITS = {"signed_constant": "signed_constant", "kaiming_normal": "keep", "kaiming_uniform": "keep",
                 "standard": "keep"}
_ONLY = {"conv_type": ("SubnetConv",), "bn_type": ("NonAffineBatchNorm",), "freeze_weights": (True,),
         "prune_type": ("BottomK",), "round": ("naive",)}
_ONLY_WHY = {
    "conv_type": "every Linear/Conv weight carries scores in our search (ScoredModel)",
    "bn_type": "our search makes BatchNorm non-affine (weight 1, bias 0, frozen)",
    "freeze_weights": "the search trains scores only; the weights train in fine-tuning",
    "prune_type": "hc_iter freezes the globally lowest flagged scores (bottom-k)",
    "round": "the forward mask is 1[p > quantize_threshold] (naive rounding)",
}
_ENVIRONMENT = {"workers": "data-loader workers: CIFAR and MNIST are held in memory and need none",
                "name": "their run name: our run folder is named <algorithm>-<hash of the config>"}
# every key we read, for the error on an unknown one
KEYS = ("algo", "iter_period", "arch", "dataset", "name", "optimizer", "lr", "lr_policy", "fine_tune_lr",
        "fine_tune_lr_policy", "epochs", "wd", "momentum", "batch_size", "conv_type", "bn_type", "freeze_weights",
        "prune_type", "target_sparsity", "unflag_before_finetune", "init", "score_init", "scale_fan", "round",
        "noise", "noise_ratio", "hc_quantized", "quantize_threshold", "regularization", "lmbda", "workers", "gpu",
        "checkpoint_at_prune", "skip_sanity_checks", "gamma", "seed", "fine_tune_epochs", "lr_adjust")


def _choice(key: str, value: Any, allowed) -> Any:
    if value not in allowed:
        raise ConversionError(f"{key}: {value!r} has no equivalent; allowed: {', '.join(map(str, allowed))}")
    return value


def convert_with_notes(text: str) -> tuple[dict[str, Any], list[str]]:
    """(our experiment config, notes) for the text of their YAML config."""
    import yaml

    from ..config.load import safe_yaml

    try:
        their = safe_yaml(text)
    except yaml.YAMLError as e:
        raise ConversionError(f"not a YAML file: {e}") from None
    if not isinstance(their, dict):
        raise ConversionError("a Rare Gems config is a YAML mapping of key: value")
    unknown = sorted(set(their) - set(KEYS))
    if unknown:
        raise ConversionError(f"unknown Rare Gems keys {unknown}; known: {', '.join(KEYS)}")
    streamed = str(their.get("dataset", "CIFAR10")).lower() in ("imagenet", "tinyimagenet")   # data.workers there
    notes = [f"{key}: {their[key]!r}: {why}" for key, why in _ENVIRONMENT.items()
             if key in their and not (key == "workers" and streamed)]
    for key, allowed in _ONLY.items():
        if key in their and their[key] not in allowed:
            raise ConversionError(f"{key}: {their[key]!r} has no equivalent; allowed: {', '.join(map(str, allowed))} "
                                  f"({_ONLY_WHY[key]})")

    algorithm, block = _ALGOS[_choice("algo", their.get("algo", "hc_iter"), tuple(_ALGOS))]
    dataset = str(their.get("dataset", "CIFAR10")).lower()
    data, default_arch = _DATASETS[_choice("dataset", dataset, tuple(_DATASETS))]
    if streamed and "workers" in their:
        data = {**data, "workers": their["workers"]}
    from ..models import list_models
    arch = str(their.get("arch", default_arch)).lower()
    model = {"name": _choice("arch", arch, tuple(list_models()))}

    kept = their.get("target_sparsity", 50.0)
    if isinstance(kept, bool) or not isinstance(kept, (int, float)) or not 0 < kept <= 100:
        raise ConversionError(f"target_sparsity is the percent of weights kept, in (0, 100]; got {kept!r}")
    epochs = int(their.get("epochs", 150))
    block = {"algorithm": algorithm, "sparsity": round(1.0 - float(kept) / 100.0, 8), **block}

    optimizer_name = _choice("optimizer", their.get("optimizer", "sgd"), ("sgd", "adam"))
    optimizer = {"name": optimizer_name, "lr": float(their.get("lr", 0.1)), "weight_decay": float(their.get("wd", 0.0))}
    if optimizer_name == "sgd":
        optimizer["momentum"] = float(their.get("momentum", 0.9))
    elif "momentum" in their:
        notes.append("momentum: Adam has no momentum setting; its betas stay at their defaults")
    gamma = float(their.get("gamma", 0.1))
    lr_adjust = int(their.get("lr_adjust", 50))
    policy = _POLICIES[_choice("lr_policy", their.get("lr_policy", "cosine_lr"), tuple(_POLICIES))]
    schedule: dict[str, Any] = {"name": policy}
    if policy == "step":
        schedule.update(milestones=[float(m) for m in range(lr_adjust, epochs, lr_adjust)], gamma=gamma)

    ft_policy = _choice("fine_tune_lr_policy", their.get("fine_tune_lr_policy", "cosine_lr"), tuple(_POLICIES))
    block.update(fine_tune_lr=float(their.get("fine_tune_lr", 0.01)),
                 fine_tune_lr_policy=ft_policy.removesuffix("_lr"), lr_gamma=gamma, lr_adjust=lr_adjust)
    if "fine_tune_epochs" in their:
        block["fine_tune_epochs"] = int(their["fine_tune_epochs"])
    block["weight_init"] = _WEIGHT_INITS[_choice("init", their.get("init", "signed_constant"), tuple(_WEIGHT_INITS))]
    if block["weight_init"] == "keep":
        notes.append(f"init: {their['init']}: the frozen weights are the model's own initial weights "
                     "(Kaiming-uniform for our Linear/Conv layers)")
    block["score_init"] = _choice("score_init", their.get("score_init", "unif"),
                                  ("unif", "half", "bern") if algorithm == "gem" else ("unif", "half", "bern", "kaiming"))
    block["scale_fan"] = bool(their.get("scale_fan", False))
    if bool(their.get("noise", False)) and float(their.get("noise_ratio", 0.0)) != 0.0:
        raise ConversionError(f"noise_ratio {their['noise_ratio']}: noise added to the scores has no equivalent; "
                              "allowed: noise_ratio 0 (or noise: False)")
    if algorithm == "gem":
        block.update(iter_period=int(their.get("iter_period", 5)),
                     unflag_before_finetune=bool(their.get("unflag_before_finetune", True)),
                     quantized=bool(their.get("hc_quantized", True)),
                     quantize_threshold=float(their.get("quantize_threshold", 0.5)),
                     regularization=_choice("regularization", their.get("regularization", "L2"), ("L2", "L1", "none")),
                     lmbda=float(their.get("lmbda", 1e-4)),
                     checkpoint_at_prune=bool(their.get("checkpoint_at_prune", False)))
    else:
        gem_only = sorted(k for k in ("iter_period", "unflag_before_finetune", "hc_quantized", "quantize_threshold",
                                      "regularization", "lmbda", "checkpoint_at_prune") if k in their)
        if gem_only:
            notes.append(f"{', '.join(gem_only)}: GEM-MINER settings, unused by edge-popup (as in their code)")
    block["sanity_checks"] = not bool(their.get("skip_sanity_checks", False))

    config: dict[str, Any] = {"seed": int(their.get("seed", 0)), "data": {**data, "batch_size": int(their.get(
        "batch_size", 128))}, "model": model, "optimizer": optimizer, "lr_schedule": schedule, "epochs": epochs}
    if "gpu" in their and their["gpu"] is not None:
        config["device"] = f"cuda:{int(their['gpu'])}"
    config["sparsity"] = block
    return config, notes


def convert(text: str) -> dict[str, Any]:
    """Our experiment config for the text of their YAML config (notes: :func:`convert_with_notes`)."""
    return convert_with_notes(text)[0]
