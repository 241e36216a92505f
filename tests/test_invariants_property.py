"""The engine's invariants as a property, over every registered method that the engine hosts.

Hypothesis draws the method, the optimizer (SGD with momentum and weight decay, Adam, AdamW),
the model (linear layers only, or a conv layer with BatchNorm before a linear one), the
sparsity and the seed; the method's own keyword arguments make it update at least 3 times in
the run. After every step the weights outside the masks are exactly 0; after every mask update
the counts are exact (kept by fixed-count methods, on target for gradual ones) and grown
weights start at 0 with zeroed optimizer state. The default suite draws a few examples, the
slow suite many.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsparse as sparse

from helpers import ConvNet, mlp
from test_registry_contract import SPE, TOTAL, _changes_masks, _check_after_update, _frequent, _own_loop

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05),
}
BUILT_IN = sparse.list_algorithms()   # at import: tests that register a family of their own run later
HOSTED = [n for n in BUILT_IN if not _own_loop(sparse.get_algorithm(n))]


def _model_and_batch(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        return mlp((8, 32, 24, 4)), (torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
    return ConvNet(), (torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))


def _exactly_zero_outside(engine):
    for sp in engine._sps:
        assert sp.mask.dtype == torch.bool
        assert (sp.param[~sp.mask] == 0).all(), sp.name


def _check(name: str, opt_name: str, kind: str, sparsity: float, seed: int) -> None:
    torch.manual_seed(seed)
    model, (x, y) = _model_and_batch(kind, seed)
    opt = OPTIMIZERS[opt_name](model.parameters())
    kwargs = _frequent(name)
    if name != "imp":    # IMP reaches its target by levels of prune_fraction
        kwargs["sparsity"] = sparsity
    engine = sparse.Sparsifier(model, opt, sparse.create(name, **kwargs), total_steps=TOTAL,
                               steps_per_epoch=SPE, data=(x, y), seed=seed)
    _exactly_zero_outside(engine)
    initial = [int(sp.mask.sum()) for sp in engine.groups[0].params]
    updates = 0
    for _ in range(TOTAL):
        before = {sp.name: sp.mask.clone() for sp in engine._sps}
        n = len(engine.history)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        _exactly_zero_outside(engine)
        if len(engine.history) > n:
            updates += 1
            _check_after_update(engine, opt, before, initial)
    if _changes_masks(sparse.get_algorithm(name)):
        assert updates >= 3, f"{name} made {updates} mask updates in {TOTAL} steps"
    else:
        assert updates == 0


CASES = dict(name=st.sampled_from(HOSTED), opt_name=st.sampled_from(sorted(OPTIMIZERS)),
             kind=st.sampled_from(["linear", "conv"]), sparsity=st.floats(0.55, 0.95),   # GraNet starts at 0.5,
             seed=st.integers(0, 10_000))


@settings(max_examples=12, deadline=None)
@given(**CASES)
def test_engine_invariants_hold_for_every_hosted_method(name, opt_name, kind, sparsity, seed):
    _check(name, opt_name, kind, sparsity, seed)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(**CASES)
def test_engine_invariants_hold_for_every_hosted_method_many_examples(name, opt_name, kind, sparsity, seed):
    _check(name, opt_name, kind, sparsity, seed)


def test_the_property_covers_the_registry():
    # a method the engine hosts that the property did not draw from would go untested
    own = {n for n in BUILT_IN if _own_loop(sparse.get_algorithm(n))}
    assert own == {"edge_popup", "gem"} and set(HOSTED) == set(BUILT_IN) - own and len(HOSTED) == 19
