"""The Sup-tickets / GraNet command-line converter: the published commands equal the examples,
every example validates and trains a few steps on tiny synthetic data of its shape, and each
option maps where docs/coming-from/suptickets.md says (or raises an error naming it)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fastsparse.experiments.config import load_config, load_yaml, parse_config
from fastsparse.experiments.convert import ConversionError, convert, convert_with_notes

ROOT = Path(__file__).resolve().parents[1]
CIFAR_FLAGS = ("--update_bn --pre_train --cyclic_train --re_explore --no_maskupdates --cyc_lr --lr_2 0.005 "
               "--lr_1 0.001 --cycle 8 --cycle_rate 0.1 --sparse --decay-schedule constant --seed 41 "
               "--sparse-init ERK --update-frequency 1000 --batch-size 128 --prune-rate 0.5 --large-death-rate 0.5")
PUBLISHED = {
    "suptickets_cifar100_resnet50_granet": "python3 main_suptickets.py --indicate_method granet " + CIFAR_FLAGS +
    " --method GraNet --growth gradient --prune magnitude --init-density 0.5 --final-density 0.05 --epochs 250 "
    "--model ResNet50 --data cifar100",
    "suptickets_cifar100_resnet50_rigl": "python3 main_suptickets.py --indicate_method rigl " + CIFAR_FLAGS +
    " --method DST --growth gradient --prune magnitude --init-density 0.05 --final-density 0.05 --epochs 250 "
    "--model ResNet50 --data cifar100",
    "suptickets_cifar100_resnet50_set": "python3 main_suptickets.py --indicate_method set " + CIFAR_FLAGS +
    " --method DST --growth random --prune magnitude --init-density 0.05 --final-density 0.05 --epochs 250 "
    "--model ResNet50 --data cifar100",
}
IMAGENET = ("python $1multiproc.py --nproc_per_node 2 $1main.py --sparse --sparse-init ERK --first_m 30 --second_m 60 "
            "--third_m 85 --method {method} --init-prune-epoch 0 --final-prune-epoch 30 --init-density {init} "
            "--final-density 0.1 --multiplier 1 --growth gradient --seed 17 --master_port 7768 -j20 -p 500 "
            "--arch resnet50 -c fanin --update-frequency 4000 --label-smoothing 0.1 -b 64 --lr 0.1 --warmup 5 "
            "--density 0.1 $2 ../../imagenet2012/ --epochs 100 --indicate_method {name} --cyclic_epochs 8 "
            "--pretrain_epoch 92 --pre_train --cyclic_train --bn_update --lr_2 0.0005 --lr_1 0.0001 --cycle 2 "
            "--large-death-rate 0.5 --cyc_lr")
PUBLISHED["imagenet_resnet50_suptickets_rigl"] = IMAGENET.format(method="DST", init=0.5, name="Rigl")
PUBLISHED["imagenet_resnet50_suptickets_granet"] = IMAGENET.format(method="GraNet", init=0.1, name="Granet")


def _example(name: str) -> dict:
    return load_yaml(ROOT / "examples" / f"{name}.yaml")


def _tiny(name: str) -> list[str]:
    """--set overrides: synthetic data of the example's shape (ImageNet at 32x32 instead of 224x224,
    the ImageNet stem kept), 4 images, one cycle of one epoch, ResNet-50 at width 16 (CPU time)."""
    shape = "[3, 32, 32]"
    classes = 100 if "cifar100" in name else 1000
    return [f"data={{name: synthetic, shape: {shape}, classes: {classes}, n_train: 4, n_test: 2, batch_size: 2}}",
            "epochs=2", "sparsity.cycle=1", "sparsity.cycle_rate=0.5", "model.width=16",
            "lr_schedule.milestones=[1]",
            # mask updates every step, so the gradual methods reach their target in the 2 steps before the cycle
            "sparsity.base_kwargs.freq=1" if "granet" in name else "sparsity.base_kwargs.update.freq=1"]


# --- the published commands are the examples -----------------------------------------------------

def test_published_cifar100_granet_command_is_the_example():
    assert convert("suptickets", PUBLISHED["suptickets_cifar100_resnet50_granet"]) == \
        _example("suptickets_cifar100_resnet50_granet")


def test_published_cifar100_rigl_command_is_the_example():
    assert convert("suptickets", PUBLISHED["suptickets_cifar100_resnet50_rigl"]) == \
        _example("suptickets_cifar100_resnet50_rigl")


def test_published_cifar100_set_command_is_the_example():
    assert convert("suptickets", PUBLISHED["suptickets_cifar100_resnet50_set"]) == \
        _example("suptickets_cifar100_resnet50_set")


def test_published_imagenet_rigl_command_is_the_example():
    assert convert("suptickets", PUBLISHED["imagenet_resnet50_suptickets_rigl"]) == \
        _example("imagenet_resnet50_suptickets_rigl")


def test_published_imagenet_granet_command_is_the_example():
    assert convert("suptickets", PUBLISHED["imagenet_resnet50_suptickets_granet"]) == \
        _example("imagenet_resnet50_suptickets_granet")


# --- every example validates, dry-runs and trains a few steps -----------------------------------

@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_example_validates_and_dry_runs(name):
    from fastsparse.experiments.runner import prepare

    parse_config(_example(name))
    raw = load_config(ROOT / "examples" / f"{name}.yaml", _tiny(name)[:1])   # the real data is absent here
    exp = prepare(raw, load_data=False)
    assert exp.model.fc.out_features == (100 if "cifar100" in name else 1000)
    assert exp.model.conv1.kernel_size == ((3, 3) if "cifar" in name else (7, 7))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_example_trains_a_few_steps_on_tiny_synthetic_data(name, tmp_path):
    from fastsparse.experiments.runner import run

    raw = load_config(ROOT / "examples" / f"{name}.yaml", _tiny(name))
    summary = run(raw, tmp_path, progress=False)
    assert summary["steps"] == 4
    assert summary["sparsity"] == pytest.approx(raw["sparsity"]["sparsity"], abs=0.01)


# --- options, one by one -----------------------------------------------------------------------

CIFAR = "python3 main_suptickets.py --sparse --model ResNet50 --data cifar100 "


def _sparsity(args: str, base: str = CIFAR) -> dict:
    return convert("suptickets", base + args)["sparsity"]


def test_method_maps_to_the_algorithm_and_scope():
    # --method GraNet / GraNet_uniform / GMP / GMP_uniform / DST (without cycles: the block itself)
    assert _sparsity("--method GraNet")["algorithm"] == "granet"
    assert _sparsity("--method GraNet")["scope"] == "global"
    assert _sparsity("--method GraNet_uniform")["scope"] == "local"
    gmp = _sparsity("--method GMP --init-density 0.5 --final-density 0.1")
    assert (gmp["algorithm"], gmp["scope"], gmp["initial_sparsity"], gmp["sparsity"]) == ("gmp", "global", 0.5, 0.9)
    assert _sparsity("--method GMP_uniform")["scope"] == "local"
    assert _sparsity("--method DST --init-density 0.05")["algorithm"] == "rigl"
    with pytest.raises(ConversionError, match="--method 'SNIP' has no equivalent; allowed: GraNet, GraNet_uniform"):
        _sparsity("--method SNIP")


def test_growth_picks_rigl_set_or_snfs_for_dst():
    assert _sparsity("--method DST --growth gradient")["algorithm"] == "rigl"
    assert _sparsity("--method DST --growth random")["algorithm"] == "set"
    assert _sparsity("--method DST --growth momentum --redistribution momentum")["algorithm"] == "snfs"
    with pytest.raises(ConversionError, match="--growth random has no equivalent for --method GraNet"):
        _sparsity("--method GraNet --growth random")
    with pytest.raises(ConversionError, match="--growth 'momentum_neuron' has no equivalent"):
        _sparsity("--method DST --growth momentum_neuron")


def test_prune_and_redistribution_modes():
    assert _sparsity("--method DST --prune magnitude")["keep_score"] == "magnitude"
    assert _sparsity("--method DST --prune SET")["drop_rule"] == "set"
    assert _sparsity("--method DST --prune threshold")["drop_rule"] == "threshold"
    # --redistribution none, --redistribution momentum, --redistribution magnitude, --redistribution nonzeros
    for mode in ("none", "momentum", "magnitude", "nonzeros"):
        assert _sparsity(f"--method DST --redistribution {mode}")["redistribution"] == mode
    with pytest.raises(ConversionError, match="--prune 'CS_death' has no equivalent; allowed: magnitude, SET"):
        _sparsity("--method DST --prune CS_death")


def test_sparse_init_gives_the_distribution_or_a_pruning_init():
    assert _sparsity("--sparse-init ERK")["distribution"] == "erk"
    assert _sparsity("--sparse-init uniform")["distribution"] == "uniform"
    assert _sparsity("--method GMP --sparse-init GMP")["initial_sparsity"] == 0.0
    assert _sparsity("--sparse-init prune_uniform --fix --pruning-rate 0.3") == \
        {"algorithm": "prune_uniform", "sparsity": 0.3}
    assert _sparsity("--sparse-init prune_global --fix")["algorithm"] == "prune_global"
    assert _sparsity("--sparse-init prune_and_grow_uniform --fix")["algorithm"] == "prune_and_grow_uniform"
    assert _sparsity("--sparse-init prune_and_grow_global --fix")["algorithm"] == "prune_and_grow_global"
    assert _sparsity("--sparse-init prune_structured --fix")["granularity"] == "filter"
    assert _sparsity("--sparse-init prune_and_grow_structured --fix") == \
        {"algorithm": "prune_and_grow_uniform", "sparsity": 0.5, "granularity": "filter"}
    with pytest.raises(ConversionError, match="add --fix"):
        _sparsity("--sparse-init prune_uniform")
    parse_config(convert("suptickets", CIFAR + "--sparse-init prune_structured --fix"))


def test_densities_prune_epochs_rate_frequency_and_decay_schedule():
    # --init-density --final-density --init-prune-epoch --final-prune-epoch --prune-rate --update-frequency
    s = _sparsity("--method GraNet --init-density 0.5 --final-density 0.1 --init-prune-epoch 20 "
                  "--final-prune-epoch 80 --prune-rate 0.3 --update-frequency 500 --epochs 160")
    assert (s["initial_sparsity"], s["sparsity"]) == (0.5, 0.9)
    assert (s["start"], s["end"], s["freq"]) == (0.125, 0.5, 500)
    # --decay-schedule cosine: r_t from 0.3 to 0.005; constant: 0.3 throughout
    assert (s["regrow_fraction"], s["regrow_min"], s["keep_regrowing"]) == (0.3, 0.005, True)
    const = _sparsity("--method GraNet --prune-rate 0.3 --decay-schedule constant")
    assert (const["regrow_fraction"], const["regrow_min"]) == (0.3, 0.3)
    dst = _sparsity("--method DST --prune-rate 0.3 --decay-schedule constant --update-frequency 500")
    assert dst["drop_fraction"] == {"type": "constant", "value": 0.3} and dst["update"] == {"freq": 500}
    assert _sparsity("--method DST --prune-rate 0.3")["drop_fraction"] == \
        {"type": "cosine", "init": 0.3, "half_period": 1.0, "minimum": 0.005}
    with pytest.raises(ConversionError, match="--decay-schedule 'linear' has no equivalent; allowed: cosine, constant"):
        _sparsity("--method DST --decay-schedule linear")
    with pytest.raises(ConversionError, match="--final-prune-epoch 200 must lie inside the 160 epochs"):
        _sparsity("--method GraNet --final-prune-epoch 200 --epochs 160")


def test_superposition_options_make_a_suptickets_block():
    # --cyc_lr --cycle --cycle_rate --lr_1 --lr_2 --re_explore --large-death-rate --superposing_method --CIMA_factor
    s = _sparsity("--method DST --pre_train --cyclic_train --cyc_lr --no_maskupdates --update_bn --re_explore "
                  "--cycle 4 --cycle_rate 0.2 --lr_1 0.05 --lr_2 0.001 --large-death-rate 0.4 "
                  "--superposing_method CIMA --CIMA_factor 0.3 --epochs 100")
    assert s["algorithm"] == "suptickets" and s["base"] == "rigl"
    assert {k: s[k] for k in ("cycle", "cycle_rate", "lr_1", "lr_2", "re_explore", "explore_rate", "superposition",
                              "cima_factor")} == {"cycle": 4, "cycle_rate": 0.2, "lr_1": 0.05, "lr_2": 0.001,
                                                  "re_explore": True, "explore_rate": 0.4, "superposition": "cima",
                                                  "cima_factor": 0.3}
    with pytest.raises(ConversionError, match="add --cyc_lr"):
        _sparsity("--pre_train --cyclic_train --no_maskupdates")
    with pytest.raises(ConversionError, match="add --pre_train"):
        _sparsity("--cyclic_train --cyc_lr")
    with pytest.raises(ConversionError, match="--superposing_method 'SWA' has no equivalent; allowed: CAA, CIMA"):
        _sparsity("--pre_train --cyclic_train --cyc_lr --superposing_method SWA")
    with pytest.raises(ConversionError, match="--re_explore belongs to the cyclic phase"):
        _sparsity("--re_explore")


def test_no_maskupdates_update_bn_and_bn_update_are_notes_when_absent():
    cmd = CIFAR + "--method DST --pre_train --cyclic_train --cyc_lr --epochs 100"
    _, notes = convert_with_notes("suptickets", cmd)
    assert any("no --no_maskupdates" in n for n in notes)
    assert any("--update_bn/--bn_update" in n for n in notes)
    _, notes = convert_with_notes("suptickets", cmd + " --no_maskupdates --update_bn")
    assert not any("--no_maskupdates" in n or "--update_bn" in n for n in notes)


def test_pre_train_and_cyclic_train_choose_the_phases():
    assert _sparsity("--method DST --pre_train --cyclic_train --cyc_lr --epochs 100")["algorithm"] == "suptickets"
    plain, notes = convert_with_notes("suptickets", CIFAR + "--method DST --pre_train")
    assert plain["sparsity"]["algorithm"] == "rigl" and any("no tickets" in n for n in notes)


def test_training_options_seed_batch_epochs_lr_model_data():
    # --seed --batch-size --epochs --lr --model --data --momentum --l2 --optimizer --nolrsche
    cfg = convert("suptickets", "python3 main_suptickets.py --seed 3 --batch-size 64 --epochs 200 --lr 0.05 "
                                "--model ResNet50 --data cifar10 --momentum 0.8 --l2 1e-4")
    assert (cfg["seed"], cfg["data"]["batch_size"], cfg["epochs"]) == (3, 64, 200)
    assert cfg["optimizer"] == {"name": "sgd", "lr": 0.05, "weight_decay": 1e-4, "momentum": 0.8}
    assert cfg["model"] == {"name": "resnet50", "stem": "cifar"} and cfg["data"]["name"] == "cifar10"
    # their CIFAR step schedule: ×0.1 at 50% and 75% of the epochs before the cycles
    assert cfg["lr_schedule"] == {"name": "step", "milestones": [100, 150], "gamma": 0.1}
    assert "sparsity" not in cfg            # no --sparse: dense
    assert convert("suptickets", CIFAR + "--nolrsche")["lr_schedule"] == {"name": "constant"}
    with pytest.raises(ConversionError, match="--model 'vgg-like' has no equivalent; allowed: ResNet50"):
        convert("suptickets", "python3 main_suptickets.py --data cifar100")


IMAGENET_BASE = "python main.py --sparse --method DST --init-density 0.1 data/imagenet "


def test_imagenet_options_arch_config_warmup_smoothing_milestones_multiplier_density():
    # --arch -c fanin --warmup --label-smoothing --first_m --second_m --third_m --multiplier --density -b
    cfg = convert("suptickets", IMAGENET_BASE + "--arch resnet50 -c fanin --warmup 5 --label-smoothing 0.1 "
                                                "--first_m 30 --second_m 60 --third_m 85 --multiplier 2 --density 0.2 "
                                                "-b 32 --init-density 0.2 --epochs 180")
    assert cfg["model"] == {"name": "resnet50", "stem": "imagenet", "conv_init": "fan_in"}
    assert cfg["lr_schedule"] == {"name": "step", "milestones": [60, 120, 170], "gamma": 0.1, "warmup_epochs": 5}
    assert cfg["label_smoothing"] == 0.1 and cfg["sparsity"]["sparsity"] == 0.8
    assert cfg["data"] == {"name": "imagefolder", "root": "data/imagenet", "image_size": 224, "batch_size": 32}
    assert convert("suptickets", IMAGENET_BASE + "-c classic")["model"]["conv_init"] == "fan_out"
    assert convert("suptickets", IMAGENET_BASE + "--weight-decay 5e-5")["optimizer"]["weight_decay"] == 5e-5


def test_imagenet_cyclic_epochs_and_pretrain_epoch_give_the_cycle_rate():
    # --cyclic_epochs 8 of --epochs 100 -> cycle_rate 0.08; --pretrain_epoch must be the rest
    s = convert("suptickets", IMAGENET_BASE + "--epochs 100 --pretrain_epoch 92 --cyclic_epochs 8 --cycle 2 "
                                              "--pre_train --cyclic_train --cyc_lr --bn_update")["sparsity"]
    assert (s["cycle"], s["cycle_rate"]) == (2, 0.08)
    with pytest.raises(ConversionError, match="--pretrain_epoch 90 \\+ --cyclic_epochs 8 must equal --epochs 100"):
        convert("suptickets", IMAGENET_BASE + "--epochs 100 --pretrain_epoch 90 --cyclic_epochs 8 --pre_train "
                                              "--cyclic_train --cyc_lr")


def test_run_environment_options_become_notes_never_silence():
    # -j --workers -p --print-freq --master_port --indicate_method --nproc_per_node $2 --save --log-interval
    cfg, notes = convert_with_notes("suptickets", "python multiproc.py --nproc_per_node 4 main.py -j20 -p 500 "
                                                  "--master_port 7768 --indicate_method x $2 data/in")
    text = "\n".join(notes)
    for option in ("--print-freq 500", "--master_port 7768", "--indicate_method x",
                   "torchrun --nproc_per_node 4", "$2"):
        assert option in text
    # ImageNet images stream from disk: their -j is our data.workers, not a note
    assert cfg["data"]["workers"] == 20 and "--workers" not in text
    _, notes = convert_with_notes("suptickets", "python3 main_suptickets.py --model ResNet50 --data cifar100 "
                                                "--log-interval 10 --save m.pt -j 4")
    assert any("--log-interval 10" in n for n in notes) and any("--save m.pt" in n for n in notes)
    assert any(n.startswith("--workers 4: data-loading workers: fastsparse holds CIFAR in memory") for n in notes)


def test_unknown_options_and_bad_values_name_what_is_allowed():
    with pytest.raises(ConversionError, match=r"unknown option '--bogus' for their CIFAR main_suptickets.py; "
                                              r"allowed: .*--CIMA_factor"):
        convert("suptickets", CIFAR + "--bogus 1")
    with pytest.raises(ConversionError, match=r"unknown option '--first_m' \(an option of their ImageNet main.py\)"):
        convert("suptickets", CIFAR + "--first_m 30")
    with pytest.raises(ConversionError, match="--cycle needs an integer, got 'two'"):
        convert("suptickets", CIFAR + "--cycle two")
    with pytest.raises(ConversionError, match="--epochs needs a value"):
        convert("suptickets", CIFAR + "--epochs")
    with pytest.raises(ConversionError, match="unknown script 'train.py'"):
        convert("suptickets", "python train.py --sparse")
    with pytest.raises(ConversionError, match="unknown source system 'granet'"):
        convert("granet", CIFAR)


def test_cli_convert_writes_the_config_with_notes_as_comments(tmp_path):
    from typer.testing import CliRunner

    from fastsparse.experiments.cli import app

    out = tmp_path / "c.yaml"
    result = CliRunner().invoke(app, ["convert", "--from", "suptickets", PUBLISHED["suptickets_cifar100_resnet50_rigl"],
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("# converted by: fastsparse convert --from suptickets")
    assert "# note: --indicate_method rigl" in text
    assert yaml.safe_load(text) == _example("suptickets_cifar100_resnet50_rigl")
    bad = CliRunner().invoke(app, ["convert", "--from", "suptickets", CIFAR + "--bogus 1"])
    assert bad.exit_code == 2 and "--bogus" in bad.output
