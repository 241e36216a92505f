"""Coming from Rare Gems: every key of its sample config converts (``fastsparse convert --from
rare-gems``) to a setting that does what theirs does; the sample equals our example config,
which validates and runs a few steps."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from fastsparse.core.schedules import Clock
from typer.testing import CliRunner

from fastsparse.algorithms.gems import GemMiner
from fastsparse.recipes.score_search import ScoredModel, sanity_variants, signed_constant_
from fastsparse.experiments.cli import app
from fastsparse.experiments.config import load_config, parse_config
from fastsparse.experiments.convert import ConversionError, convert, convert_with_notes
from fastsparse.core.masks import select_params
from fastsparse.experiments.runner import prepare, run

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "rare_gems_resnet20.yml"     # their README's sample, verbatim
EXAMPLE = ROOT / "examples" / "raregems_resnet20_cifar10.yaml"
TINY = ["data={name: synthetic, shape: [3, 32, 32], classes: 10, n_train: 16, n_test: 8, batch_size: 8}",
        "device=cpu", "epochs=3", "sparsity.iter_period=1", "sparsity.fine_tune_epochs=1",
        "sparsity.sparsity=0.9"]


def sample(**changes) -> str:
    cfg = yaml.safe_load(SAMPLE.read_text())
    cfg.update(changes)
    return yaml.safe_dump(cfg)


def block(**changes) -> dict:
    return convert("rare-gems", sample(**changes))["sparsity"]


def test_the_sample_config_converts_to_our_example():
    assert convert("rare-gems", SAMPLE.read_text()) == yaml.safe_load(EXAMPLE.read_text())


def test_the_example_validates_and_runs_a_few_steps_on_tiny_data_of_its_shape(tmp_path):
    cfg, _ = parse_config(load_config(EXAMPLE))
    exp = prepare(cfg, load_data=False, require_data=False)  # the dry run: resnet20 on 3x32x32, 10 classes
    assert exp.plan is not None and exp.plan.algorithms[0].name == "gem" and [p.name for p in exp.phases] == ["search", "fine_tune"]
    summary = run(load_config(EXAMPLE, TINY), tmp_path, progress=False)
    assert summary["sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert (Path(summary["run_dir"]) / "sanity.json").is_file()


def test_the_command_line_writes_the_experiment_file(tmp_path):
    out = tmp_path / "ours.yaml"
    result = CliRunner().invoke(app, ["convert", "--from", "rare-gems", str(SAMPLE), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text()) == yaml.safe_load(EXAMPLE.read_text())


@pytest.mark.parametrize("kept, sparsity", [(0.59, 0.9941), (1.44, 0.9856), (50, 0.5), (100, 0.0)])
def test_target_sparsity_is_the_percent_of_weights_kept(kept, sparsity):
    assert block(target_sparsity=kept)["sparsity"] == pytest.approx(sparsity)
    with pytest.raises(ConversionError, match="target_sparsity is the percent of weights kept"):
        block(target_sparsity=0)


@pytest.mark.parametrize("algo, ours", [("hc_iter", ("gem", "hc_iter", None)), ("hc", ("gem", "hc", None)),
                                        ("ep", ("edge_popup", None, None)),
                                        ("global_ep", ("edge_popup", None, "global"))])
def test_algo(algo, ours):
    b = block(algo=algo)
    assert (b["algorithm"], b.get("algo"), b.get("scope")) == ours
    with pytest.raises(ConversionError, match="algo: 'imp' has no equivalent; allowed: hc, hc_iter, ep, global_ep"):
        block(algo="imp")


def test_iter_period_epochs_lr_wd_momentum_batch_size_optimizer_arch_dataset():
    cfg = convert("rare-gems", sample(iter_period=10, epochs=60, lr=0.05, wd=5e-4, momentum=0.8, batch_size=32,
                                      arch="resnet32", dataset="CIFAR100", optimizer="sgd"))
    assert cfg["sparsity"]["iter_period"] == 10 and cfg["epochs"] == 60
    assert cfg["optimizer"] == {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4, "momentum": 0.8}
    assert cfg["data"] == {"name": "cifar100", "root": "data/cifar100", "batch_size": 32}
    assert cfg["model"] == {"name": "resnet32"}
    assert convert("rare-gems", sample(optimizer="adam"))["optimizer"]["name"] == "adam"
    with pytest.raises(ConversionError, match="arch: 'vgg19' has no equivalent"):
        convert("rare-gems", sample(arch="vgg19"))


def test_lr_policy_and_gamma_become_the_search_schedule():
    cfg = convert("rare-gems", sample(lr_policy="multistep_lr", gamma=0.2, epochs=150))
    assert cfg["lr_schedule"] == {"name": "step", "milestones": [50.0, 100.0], "gamma": 0.2}
    assert convert("rare-gems", sample(lr_policy="constant_lr"))["lr_schedule"] == {"name": "constant"}
    assert convert("rare-gems", sample(lr_policy="cosine_lr"))["lr_schedule"] == {"name": "cosine"}


def test_fine_tune_lr_and_fine_tune_lr_policy():
    b = block(fine_tune_lr=0.02, fine_tune_lr_policy="multistep_lr")
    assert b["fine_tune_lr"] == 0.02 and b["fine_tune_lr_policy"] == "multistep"
    alg = GemMiner(sparsity=0.5, fine_tune_lr=0.02, fine_tune_lr_policy="multistep_lr", lr_adjust=50, lr_gamma=0.1)
    spe = 10   # steps per epoch: the factor at epoch e is the schedule's at step e · 10

    def factor(a, epoch, epochs=150):
        return a.fine_tune_schedule(spe, epochs)(Clock(round(epoch * spe), epochs * spe))

    assert [factor(alg, e) for e in (0, 49.9, 50, 120)] == pytest.approx([1, 1, 0.1, 0.01])
    cos = GemMiner(sparsity=0.5, fine_tune_lr_policy="cosine_lr")
    assert factor(cos, 75) == pytest.approx(0.5)
    assert factor(GemMiner(sparsity=0.5, fine_tune_lr_policy="constant_lr"), 140) == 1.0


@pytest.mark.parametrize("key, bad", [("conv_type", "DenseConv"), ("bn_type", "AffineBatchNorm"),
                                      ("freeze_weights", False), ("prune_type", "TopK"), ("round", "prob")])
def test_conv_type_bn_type_freeze_weights_prune_type_round_accept_what_we_implement(key, bad):
    good = yaml.safe_load(SAMPLE.read_text())[key]
    assert convert("rare-gems", sample(**{key: good}))["sparsity"]["algorithm"] == "gem"
    with pytest.raises(ConversionError, match=f"{key}: {bad!r} has no equivalent"):
        convert("rare-gems", sample(**{key: bad}))


def test_unflag_before_finetune_hc_quantized_quantize_threshold_regularization_lmbda():
    b = block(unflag_before_finetune=False, hc_quantized=True, quantize_threshold=0.7, regularization="L1",
              lmbda=1e-3)
    alg = GemMiner(**{k: b[k] for k in ("sparsity", "unflag_before_finetune", "quantized", "quantize_threshold",
                                        "regularization", "lmbda")})
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    params = select_params(model)
    scored = ScoredModel(model, alg, params, [0.5])
    with torch.no_grad():
        scored.scores[0].copy_(torch.tensor([[0.2, 0.69], [0.71, 1.0]]))
    assert alg.gate(scored)[0].tolist() == [[0, 0], [1, 1]]                 # 1[p > 0.7]
    assert alg.penalty(scored).item() == pytest.approx(1e-3 * (0.2 + 0.69 + 0.71 + 1.0))   # L1 · lmbda
    assert alg.final_masks(scored)[0].tolist() == [[False, False], [True, True]]   # flags ∧ p > 0.7


def test_init_score_init_and_scale_fan():
    b = block(init="signed_constant", score_init="bern", scale_fan=True)
    assert (b["weight_init"], b["score_init"], b["scale_fan"]) == ("signed_constant", "bern", True)
    assert block(init="kaiming_normal")["weight_init"] == "keep"
    lin = torch.nn.Linear(8, 3, bias=False)
    sps = select_params(torch.nn.Sequential(lin))
    signed_constant_(sps, densities=[0.25])                               # fan-in 8 · 0.25 = 2
    assert lin.weight.abs().unique().tolist() == pytest.approx([math.sqrt(2 / 2)])
    with pytest.raises(ConversionError, match="score_init: 'skew' has no equivalent"):
        block(score_init="skew")


def test_noise_and_noise_ratio():
    assert "noise" not in block(noise=True, noise_ratio=0)
    with pytest.raises(ConversionError, match="noise_ratio 0.1: noise added to the scores has no equivalent"):
        block(noise=True, noise_ratio=0.1)


def test_workers_name_and_gpu():
    cfg, notes = convert_with_notes("rare-gems", sample(workers=8, name="run1", gpu=2))
    assert cfg["device"] == "cuda:2"
    assert any(n.startswith("workers: 8") for n in notes) and any(n.startswith("name: 'run1'") for n in notes)
    # image folders stream from disk: their workers are our data.workers, not a note
    cfg, notes = convert_with_notes("rare-gems", sample(workers=8, dataset="ImageNet"))
    assert cfg["data"]["workers"] == 8 and not any(n.startswith("workers") for n in notes)


def test_checkpoint_at_prune_and_skip_sanity_checks(tmp_path):
    b = block(checkpoint_at_prune=True, skip_sanity_checks=False)
    assert b["checkpoint_at_prune"] is True and b["sanity_checks"] is True
    assert block(skip_sanity_checks=True)["sanity_checks"] is False
    tiny = load_config(EXAMPLE, TINY + ["sparsity.checkpoint_at_prune=true", "model.name=mlp", "data.shape=[16]",
                                        "model.sizes=[16,32,10]"])
    summary = run(tiny, tmp_path, progress=False)
    run_dir = Path(summary["run_dir"])
    # 3 epochs of search with a round every epoch: ⌊(3 − 1)/1⌋ = 2 rounds, each saved
    assert sorted(p.name for p in run_dir.glob("prune_round*.pt")) == ["prune_round1.pt", "prune_round2.pt"]
    sanity = yaml.safe_load((run_dir / "sanity.json").read_text())
    assert set(sanity) == {"ticket", "shuffled", "reinit"} and all(0 <= v <= 1 for v in sanity.values())


def test_sanity_variants_keep_the_counts_and_magnitudes():
    alg = GemMiner(sparsity=0.5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    scored = ScoredModel(model, alg, select_params(model), [0.5])
    v = sanity_variants(scored, seed=3)
    w = {k: m.weights["0.weight"] for k, m in v.items()}
    assert int((w["ticket"] != 0).sum()) == int((w["shuffled"] != 0).sum()) == int((w["reinit"] != 0).sum())
    assert torch.equal(w["ticket"].abs(), w["reinit"].abs()) and not torch.equal(w["ticket"], w["reinit"])


def test_an_unknown_key_is_refused_with_the_known_ones():
    with pytest.raises(ConversionError, match=r"unknown Rare Gems keys \['warmup'\]; known: algo, iter_period"):
        convert("rare-gems", sample(warmup=5))
