"""The config schema: every shape the sparsity block takes, every error with its path, the dry run,
``from_config``, overlays and balanced groups."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import fastsparse as sparse
from fastsparse.algorithms import base as registry
from fastsparse.experiments.suite import load_suite
from fastsparse.experiments.config import (
    ConfigError, algorithm_parameters, apply_overrides, config_hash, from_config, load_config, parse_config, plan_sparsity,
    resolve_config,
)
from fastsparse.experiments.models import MLP, TransformerEncoder
from fastsparse.core.schedules import Clock, Constant, Cosine, Cubic, Cyclic, Exponential, Linear, Power, UpdateSchedule

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_rigl.yaml"


def problems_of(raw) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return {p.path: p.message for p in info.value.problems}


def example() -> dict:
    return load_config(EXAMPLE)


# --- the example file --------------------------------------------------------------------------
def test_example_validates_and_plans_rigl_with_erk():
    cfg, notes = parse_config(example())
    assert notes == []
    plan = plan_sparsity(cfg, MLP([64, 300, 100, 10]))
    (alg,) = plan.algorithms
    assert isinstance(alg, sparse.RigL) and alg.sparsity == 0.98
    assert alg.update == UpdateSchedule(freq=50, start=0, stop=0.75)
    expected = sparse.erdos_renyi_sparsity([(300, 64), (100, 300), (10, 100)], 0.98)
    rows = {r.name: r for r in plan.rows}
    assert [rows[n].target_sparsity for n in ("0.weight", "2.weight", "4.weight")] == pytest.approx(expected)
    assert rows["0.bias"].algorithm is None and "1-D" in rows["0.bias"].note
    assert plan.target_sparsity() == pytest.approx(0.98, abs=1e-3)


@pytest.mark.parametrize("name", sparse.list_algorithms())
def test_every_registered_algorithm_can_replace_rigl(name):
    from fastsparse.experiments.experiment import prepare

    raw = example()
    raw["sparsity"]["algorithm"] = name
    takes = algorithm_parameters(sparse.get_algorithm(name))
    if "drop_fraction" not in takes:   # a key of another algorithm is refused, not ignored
        assert "sparsity.drop_fraction" in problems_of(copy.deepcopy(raw))
        del raw["sparsity"]["drop_fraction"]
    if "update" not in takes:          # IMP places its levels itself; Sup-tickets' base has its own
        assert f"{name} decides itself when its masks change" in problems_of(copy.deepcopy(raw))["sparsity.update"]
        del raw["sparsity"]["update"]
    exp = prepare(raw, load_data=False)
    if exp.sparsifier is None:     # own phases (score search): the engine is built after the search, on its masks
        assert [p.name for p in exp.phases] == ["search", "fine_tune"]
    else:
        assert {g.algorithm.name for g in exp.sparsifier.groups} == {name}
    resolved = exp.resolved["sparsity"]
    assert resolved["algorithm"] == name and resolved["sparsity"] == 0.98


def test_resolved_config_is_a_fixed_point_and_its_hash_is_stable():
    cfg, _ = parse_config(example())
    resolved = resolve_config(cfg)
    again, _ = parse_config(copy.deepcopy(resolved))
    assert resolve_config(again) == resolved
    assert config_hash(resolved) == config_hash(resolve_config(again)) and len(config_hash(resolved)) == 10
    assert resolved["sparsity"]["keep_score"] == "magnitude"           # the algorithm's default, filled in
    assert resolved["data"] == {"name": "digits", "batch_size": 64, "split_seed": 0, "test_fraction": 0.25,
                                "flat": False}
    other, _ = parse_config(apply_overrides(example(), ["sparsity.sparsity=0.9"]))
    assert config_hash(resolve_config(other)) != config_hash(resolved)


# --- errors, each with its path -------------------------------------------------------------------
def test_three_errors_are_all_reported_with_their_paths():
    raw = example()
    raw["sparsity"] = [
        {"algorithm": "rigl", "sparsity": 1.5, "param_filter": ["0.weight"]},
        {"algorithm": "set", "param_filter": ["2.weight"], "update": {"freq": 0}, "drop_fractoin": 0.2},
    ]
    found = problems_of(raw)
    assert set(found) == {"sparsity[0].sparsity", "sparsity[1].update.freq", "sparsity[1].drop_fractoin"}
    assert found["sparsity[1].update.freq"].startswith("must be ≥ 1")
    assert "[0, 1)" in found["sparsity[0].sparsity"]
    assert "did you mean 'drop_fraction'" in found["sparsity[1].drop_fractoin"]


@pytest.mark.parametrize("path, value, where, words", [
    ("epochz", 3, "epochz", "did you mean 'epochs'"),
    ("sparsity.drop_fractoin", 0.3, "sparsity.drop_fractoin", "did you mean 'drop_fraction'"),
    ("optimizer.momentun", 0.9, "optimizer.momentun", "did you mean 'momentum'"),
    ("model.sizez", [1], "model.sizez", "did you mean 'sizes'"),
    ("data.nmae", "x", "data.nmae", "did you mean 'name'"),
    ("sparsity.update.frq", 3, "sparsity.update.frq", "did you mean 'freq'"),
    ("sparsity.algorithm", "rigll", "sparsity.algorithm", "did you mean 'rigl'"),
    ("sparsity.distribution", "erkk", "sparsity.distribution", "did you mean 'erk'"),
    ("lr_schedule.name", "cosin", "lr_schedule.name", "did you mean 'cosine'"),
    ("model.name", "mlpp", "model.name", "did you mean 'mlp'"),
])
def test_unknown_names_and_keys_suggest_the_right_one(path, value, where, words):
    raw = apply_overrides(example(), [f"{path}={value}"])
    found = problems_of(raw)
    assert where in found and words in found[where], found


@pytest.mark.parametrize("override, where, words", [
    ("seed=x", "seed", "must be an integer"),
    ("epochs=1.5", "epochs", "must be an integer"),
    ("epochs=0", "epochs", "must be ≥ 1"),
    ("sparsity.sparsity=abc", "sparsity.sparsity", "must be a number or a schedule"),
    ("sparsity.sparsity=1.0", "sparsity.sparsity", "[0, 1)"),
    ("sparsity.sparsity=-0.1", "sparsity.sparsity", "[0, 1)"),
    ("sparsity.sparsity={type: cosine, init: 1.2}", "sparsity.sparsity", "init"),
    ("sparsity.sparsity={type: cosin, init: 0.5}", "sparsity.sparsity", "did you mean 'cosine'"),
    ("sparsity.drop_fraction=1.5", "sparsity.drop_fraction", "[0, 1]"),
    ("sparsity.update.freq=0", "sparsity.update.freq", "must be ≥ 1"),
    ("sparsity.update.stop=-1", "sparsity.update.stop", "≥ 0"),
    ("sparsity.update=[0, 5]", "sparsity.update.steps[0]", "must be ≥ 1"),
    ("sparsity.init_method=magnitude", "sparsity.init_method", "must be one of"),
    ("sparsity.balance_out_groups=0", "sparsity.balance_out_groups", "≥ 1"),
    ("sparsity.balance_out_groups=two", "sparsity.balance_out_groups", "must be an integer"),
    ("sparsity.drop_fraction={type: cosine, init: 1.5}", "sparsity.drop_fraction", "init"),
    ("data.batch_size=0", "data.batch_size", "must be ≥ 1"),
    ("optimizer.lr=0", "optimizer.lr", "must be > 0"),
    ("sparsity=3", "sparsity", "must be a sparsity block"),
    ("data=[1]", "data", "must be a mapping"),
])
def test_wrong_types_and_ranges_say_what_is_expected(override, where, words):
    found = problems_of(apply_overrides(example(), [override]))
    assert where in found and words in found[where], found


def test_dense_as_an_algorithm_name_explains_how_to_train_dense():
    found = problems_of(apply_overrides(example(), ["sparsity.algorithm=dense"]))
    assert "leave out the sparsity block" in found["sparsity.algorithm"]


def test_balance_groups_on_a_method_without_them_is_an_error():
    found = problems_of(apply_overrides(example(), ["sparsity.algorithm=static", "sparsity.balance_out_groups=2"]))
    assert "unknown key for algorithm 'static'" in found["sparsity.balance_out_groups"]


def test_keys_of_another_algorithm_are_errors():
    found = problems_of(apply_overrides(example(), ["sparsity.algorithm=static"]))
    assert found == {"sparsity.drop_fraction": found["sparsity.drop_fraction"]}
    assert "unknown key for algorithm 'static'" in found["sparsity.drop_fraction"]


def test_batch_size_given_twice_differently_is_an_error():
    found = problems_of({**example(), "batch_size": 32})
    assert "given twice" in next(iter(found.values()))
    cfg, _ = parse_config({**example(), "batch_size": 64})
    assert cfg.data.batch_size == 64


# --- the schedules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ({"type": "constant", "value": 0.9}, Constant(0.9)),
    ({"type": "linear", "init": 0.5, "final": 0.9, "end": 0.5}, Linear(0.5, 0.0, 0.9, 0, 0.5)),
    ({"type": "exp", "init": 0.9, "gamma": 0.5, "final": 0.99}, Exponential(0.9, 0.5, 0.99)),
    ({"type": "power", "init": 0.5, "beta": 0.1}, Power(0.5, 0.1)),
    ({"type": "cosine", "init": 0.9, "half_period": 100, "minimum": 0.5}, Cosine(0.9, 100, 0.5)),
    ({"type": "cubic", "init": 0.0, "final": 0.9, "start": 0.1, "end": 0.8}, Cubic(0.0, 0.9, 0.1, 0.8)),
    ({"type": "cycling", "low": 0.8, "high": 0.9, "period": 10}, Cyclic(0.8, 0.9, 10)),
])
def test_each_schedule_type_builds_its_schedule(spec, expected):
    block = {"algorithm": "rigl", "sparsity": 0.9, "drop_fraction": spec}
    cfg, _ = parse_config({"sparsity": block})
    alg = plan_sparsity(cfg, MLP([8, 6, 4])).algorithms[0]
    assert alg.drop_fraction == expected
    assert alg.drop_fraction(Clock(3, 100)) == expected(Clock(3, 100))


def test_a_float_drop_fraction_is_rigls_cosine_decay_to_the_update_stop():
    cfg, _ = parse_config(example())
    alg = plan_sparsity(cfg, MLP([64, 300, 100, 10])).algorithms[0]
    assert alg.drop_fraction == Cosine(0.3, half_period=0.75)


def test_a_sparsity_schedule_goes_to_a_method_that_takes_one_and_is_refused_by_one_that_does_not():
    sched = {"type": "cubic", "init": 0.2, "final": 0.9, "start": 0.1, "end": 0.8}
    if "gmp" in sparse.list_algorithms():
        cfg, _ = parse_config({"sparsity": {"algorithm": "gmp", "sparsity": sched}})
        (alg,) = plan_sparsity(cfg, MLP([8, 6, 4])).algorithms
        assert (alg.sparsity, alg.initial_sparsity, alg.start, alg.end) == (0.9, 0.2, 0.1, 0.8)
    cfg, _ = parse_config({"sparsity": {"algorithm": "static", "sparsity": {"type": "constant", "value": 0.7}}})
    assert plan_sparsity(cfg, MLP([8, 6, 4])).algorithms[0].sparsity == 0.7
    cfg, _ = parse_config({"sparsity": {"algorithm": "static", "sparsity": sched}})
    with pytest.raises(ConfigError) as info:
        plan_sparsity(cfg, MLP([8, 6, 4]))
    (problem,) = info.value.problems
    assert problem.path == "sparsity.sparsity" and "static takes a constant sparsity" in problem.message


def test_update_as_a_list_of_steps():
    cfg, _ = parse_config(apply_overrides(example(), ["sparsity.update=[10, 20, 40]"]))
    alg = plan_sparsity(cfg, MLP([64, 300, 100, 10])).algorithms[0]
    assert alg.update.steps == (10, 20, 40)
    assert alg.update.is_update(Clock(20, 100)) and not alg.update.is_update(Clock(30, 100))


# --- --set ----------------------------------------------------------------------------------------
def test_overrides_reach_nested_keys_list_items_and_create_missing_ones():
    raw = {"sparsity": [{"algorithm": "rigl"}, {"algorithm": "set"}]}
    out = apply_overrides(raw, ["sparsity[1].update.freq=10", "sparsity.0.sparsity=0.8", "epochs=5",
                                "model.sizes=[8, 4]"])
    assert out == {"sparsity": [{"algorithm": "rigl", "sparsity": 0.8}, {"algorithm": "set", "update": {"freq": 10}}],
                   "epochs": 5, "model": {"sizes": [8, 4]}}
    assert raw == {"sparsity": [{"algorithm": "rigl"}, {"algorithm": "set"}]}  # the input is not changed
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(raw, ["epochs"])
    with pytest.raises(ConfigError, match="cannot reach"):
        apply_overrides(raw, ["sparsity[5].freq=1"])


# --- filters, overlays, several blocks --------------------------------------------------------------
def test_param_filter_globs_and_exclude():
    cfg, _ = parse_config({"sparsity": {"algorithm": "static", "sparsity": 0.5, "param_filter": "*.weight",
                                        "exclude": ["4.*"]}})
    plan = plan_sparsity(cfg, MLP([8, 6, 6, 4]))
    assert [r.name for r in plan.rows if r.algorithm] == ["0.weight", "2.weight"]
    assert "not matched" in {r.name: r.note for r in plan.rows}["4.weight"]
    cfg, _ = parse_config({"sparsity": {"algorithm": "static", "param_filter": ["*.nothing"]}})
    with pytest.raises(ConfigError) as info:
        plan_sparsity(cfg, MLP([8, 6, 4]))
    assert info.value.problems[0].path == "sparsity.param_filter"


def test_overlays_first_match_wins_and_keep_the_block_distribution():
    model = MLP([64, 300, 100, 10])
    cfg, _ = parse_config(apply_overrides(example(), [
        "sparsity.param_filters={'0.*': {drop_fraction: 0.1}, '*.weight': {drop_fraction: 0.2}}"]))
    plan = plan_sparsity(cfg, model)
    by_name = {sp: alg for alg in plan.algorithms for sp in alg.param_filter.names}
    assert by_name["0.weight"].drop_fraction(Clock(0, 10)) == pytest.approx(0.1)
    assert by_name["2.weight"].drop_fraction(Clock(0, 10)) == pytest.approx(0.2)
    expected = sparse.erdos_renyi_sparsity([(300, 64), (100, 300), (10, 100)], 0.98)
    assert [r.target_sparsity for r in plan.rows if r.algorithm] == pytest.approx(expected)
    assert plan.rows[0].block == 'sparsity.param_filters["0.*"]'


def test_an_overlay_may_set_its_own_sparsity():
    cfg, _ = parse_config({"sparsity": {"algorithm": "static", "sparsity": 0.9,
                                        "param_filters": {"4.*": {"sparsity": 0.5}}}})
    rows = {r.name: r.target_sparsity for r in plan_sparsity(cfg, MLP([8, 6, 6, 4])).rows}
    assert rows["4.weight"] == 0.5 and rows["0.weight"] == 0.9


def test_overlays_that_match_nothing_are_errors_with_their_pattern():
    cfg, _ = parse_config(apply_overrides(example(), [
        "sparsity.param_filters={'*qkv*': {drop_fraction: 0.1}, '*.weight': {}, '0.weight': {}}"]))
    with pytest.raises(ConfigError) as info:
        plan_sparsity(cfg, MLP([64, 300, 100, 10]))
    found = {p.path: p.message for p in info.value.problems}
    assert "matches none" in found['sparsity.param_filters["*qkv*"]']
    assert "earlier pattern" in found['sparsity.param_filters["0.weight"]']


def test_a_list_of_blocks_gives_different_algorithms_to_different_parameters():
    model = MLP([8, 6, 6, 4])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = from_config(model, opt, [
        {"algorithm": "set", "sparsity": 0.5, "param_filter": ["2.weight"], "update": {"freq": 1}},
        {"algorithm": "static", "sparsity": 0.8},                   # the default filter takes the rest
    ], total_steps=10)
    algs = {sp.name: g.algorithm.name for g in engine.groups for sp in g.params}
    assert algs == {"2.weight": "set", "0.weight": "static", "4.weight": "static"}
    with pytest.raises(ConfigError, match="must not overlap"):
        from_config(MLP([8, 6, 6, 4]), None, [
            {"algorithm": "set", "param_filter": ["*.weight"]},
            {"algorithm": "static", "param_filter": ["0.weight"]}])


def test_from_config_takes_a_block_an_experiment_or_a_file_and_matches_the_plan(tmp_path):
    block = {"algorithm": "rigl", "sparsity": 0.9, "distribution": "erk", "update": {"freq": 5}}
    masks = []
    for config in (block, {"seed": 0, "sparsity": block}, [block]):
        torch.manual_seed(0)
        model = MLP([8, 16, 4])
        engine = from_config(model, torch.optim.SGD(model.parameters(), lr=0.1), config, total_steps=50)
        assert isinstance(engine, sparse.Sparsifier) and engine.sparsity() == pytest.approx(0.9, abs=0.01)
        masks.append([m.clone() for n, m in model.named_buffers()])
    path = tmp_path / "s.yaml"
    path.write_text("sparsity:\n  algorithm: rigl\n  sparsity: 0.9\n  distribution: erk\n  update: {freq: 5}\n")
    torch.manual_seed(0)
    model = MLP([8, 16, 4])
    from_config(model, None, path, total_steps=50)
    masks.append([m.clone() for n, m in model.named_buffers()])
    for other in masks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(masks[0], other))
    with pytest.raises(ConfigError, match="no sparsity block"):
        from_config(MLP([8, 4]), None, {"seed": 1, "epochs": 3})


def test_a_users_registered_class_validates_with_its_own_arguments():
    class Halves(sparse.SparsityAlgorithm):
        name = "halves_test"

        def __init__(self, sparsity: float = 0.5, every: int = 1, **kwargs):
            super().__init__(sparsity, **kwargs)
            self.every = every

    sparse.register(Halves)
    try:
        cfg, _ = parse_config({"sparsity": {"algorithm": "halves_test", "every": 3, "sparsity": 0.5}})
        (alg,) = plan_sparsity(cfg, MLP([8, 6, 4])).algorithms
        assert isinstance(alg, Halves) and alg.every == 3
        found = problems_of({"sparsity": {"algorithm": "halves_test", "evry": 3}})
        assert "did you mean 'every'" in found["sparsity.evry"]
    finally:
        registry._REGISTRY.pop("halves_test")


# --- balanced groups (attention heads) -------------------------------------------------------------
def _group_counts(mask: torch.Tensor, dim: int, groups: int) -> list[int]:
    return mask.movedim(dim, 0).reshape(groups, -1).sum(1).tolist()


def test_balanced_groups_hold_equal_counts_after_every_update():
    torch.manual_seed(0)
    model = TransformerEncoder((1, 8, 8), 10, dim=16, depth=1, heads=4, patch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = from_config(model, opt, {
        "algorithm": "rigl", "sparsity": 0.8, "update": {"freq": 2}, "drop_fraction": 0.5,
        "param_filters": {"*attn.[qkv].weight": {"balance_out_groups": 4},
                          "*attn.out.weight": {"balance_in_groups": 4}}}, total_steps=40)
    balanced = {n: (0, 4) for n in ("layers.0.attn.q.weight", "layers.0.attn.k.weight", "layers.0.attn.v.weight")}
    balanced["layers.0.attn.out.weight"] = (1, 4)
    masks = dict(model.named_buffers())
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    before = {n: masks[n + "_mask"].clone() for n in balanced}
    for _ in range(12):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for name, (dim, g) in balanced.items():
            counts = _group_counts(masks[name + "_mask"], dim, g)
            assert len(set(counts)) == 1, (name, counts)
            assert counts[0] == round(0.2 * 16 * 16 / 4)
    assert len(engine.history) == 6 and all(r["changed"] > 0 for r in engine.history)
    assert any(not torch.equal(before[n], masks[n + "_mask"]) for n in balanced)


def test_balanced_drop_and_grow_on_numbers_worked_by_hand():
    from fastsparse.algorithms.dst import _balanced_drop_and_grow

    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)       # two groups of one row
    keep = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.2, 0.0, 0.8, 0.0]])
    grow = torch.tensor([[0.0, 0.0, 0.5, 0.7], [0.0, 0.6, 0.0, 0.1]])
    new = _balanced_drop_and_grow(mask, keep, grow, 0.5, 0, 2)
    # row 0: drop 0.1 (col 1), grow the best free col 3; row 1: drop 0.2 (col 0), grow col 1
    assert new.tolist() == [[True, False, False, True], [False, True, True, False]]


def test_balance_groups_that_do_not_divide_the_rows_are_errors():
    model = TransformerEncoder((1, 8, 8), 10, dim=16, depth=1, heads=4, patch=2)
    cfg, _ = parse_config({"sparsity": {"algorithm": "rigl", "param_filters": {"*attn.q.weight": {"balance_out_groups": 5}}}})
    with pytest.raises(ConfigError) as info:
        plan_sparsity(cfg, model)
    (problem,) = info.value.problems
    assert problem.path == 'sparsity.param_filters["*attn.q.weight"]'
    assert "balance_out_groups=5 does not divide the 16 rows of layers.0.attn.q.weight" in problem.message
    with pytest.raises(ValueError, match="does not divide"):
        sparse.Sparsifier(MLP([8, 6, 4]), None, sparse.RigL(balance_in_groups=3), hook=False)
    with pytest.raises(ValueError, match="redistribution='none'"):
        sparse.SNFS(balance_out_groups=2)


# --- suites ---------------------------------------------------------------------------------------
def test_suite_files_are_validated(tmp_path):
    assert load_suite().sparsities == [0.9, 0.98] and load_suite().seeds == 3
    bad = tmp_path / "suite.yaml"
    bad.write_text("methods: [dense, rigl, rigll]\nsparsities: [0.9, 1.2]\nbase: {epochz: 3}\n"
                   "block: {drop_fractoin: 0.3}\n")
    with pytest.raises(ConfigError) as info:
        load_suite(bad)
    found = {p.path: p.message for p in info.value.problems}
    assert "did you mean 'rigl'" in found["methods"]
    assert "[0, 1)" in found["sparsities"]
    assert "did you mean 'epochs'" in found["base.epochz"]
    assert "did you mean 'drop_fraction'" in found["block.drop_fractoin"]


# --- the shipped examples ------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((EXAMPLE.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_example_validates(path, tmp_path):
    from fastsparse.experiments.experiment import prepare

    raw = load_config(path)
    if "methods" in raw or "base" in raw:                   # a compare suite
        load_suite(path)
        return
    name = raw.get("data", {}).get("name")
    if name in ("mnist", "cifar10", "cifar100", "imagefolder"):   # files the tests do not have
        with pytest.raises(ConfigError) as info:            # training refuses: the files are needed
            prepare(raw, load_data=False)
        assert [p.path for p in info.value.problems] == ["data.root"]
        exp = prepare(raw, load_data=False, require_data=False)   # the dry run checks on shapes, with a note
        assert any(n.startswith("data.root:") and "the dry run assumes" in n for n in exp.notes)
    exp = prepare(raw, load_data=False, require_data=False)
    if raw.get("sparsity") is None:                         # a dense baseline
        assert exp.sparsifier is None and exp.plan is None
        return
    assert exp.sparsifier is not None or [p.name for p in exp.phases] == ["search", "fine_tune"]
    assert exp.plan is not None and exp.plan.rows
