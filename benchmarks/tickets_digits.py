"""Digits measurements of docs/tickets.md (ITOP, Sup-tickets, GEM-MINER, edge-popup), seeds 0-2:

    python benchmarks/tickets_digits.py        # ~5 minutes on one CPU core
    python benchmarks/tickets_digits.py gem    # only GEM-MINER vs random mask / reinit (~2.5 minutes)
"""
import math, os, statistics, sys, time, torch
from torch import nn
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import fastsparse as sparse
from fastsparse.algorithms.suptickets import SupTickets
from fastsparse.recipes.suptickets import SupTicketsTrainer
from fastsparse.experiments.models import MLP
from digits_run import digits, BATCH, SIZES, run, _train

class Loader:
    def __init__(self, x, y, seed):
        self.x, self.y, self.g = x, y, torch.Generator().manual_seed(seed)
    def __len__(self): return math.ceil(len(self.x) / BATCH)
    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=self.g)
        for i in range(0, len(self.x), BATCH):
            idx = perm[i:i + BATCH]
            yield self.x[idx], self.y[idx]

def sup(seed, base="rigl", cycle=5, cycle_rate=0.2, lr_1=0.001, lr_2=0.02, sup="caa", epochs=100):
    torch.manual_seed(seed)
    x, y, xt, yt = digits()
    model = MLP(SIZES)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw = {"drop_fraction": 0.3, "update": sparse.UpdateSchedule(freq=50, stop=0.75)} if base in ("rigl","set") else {}
    alg = SupTickets(sparsity=0.98, distribution="erk", base=base, cycle=cycle, cycle_rate=cycle_rate,
                     lr_1=lr_1, lr_2=lr_2, superposition=sup, base_kwargs=kw)
    loader = Loader(x, y, seed)
    alg.steps_per_epoch = len(loader)
    plan = alg.plan(epochs * len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, plan.pretrain_steps)
    tr = SupTicketsTrainer(model, opt, alg, loader, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), epochs,
                           scheduler=sched, seed=seed, keep_tickets=True)
    tr.fit()
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
        taccs = []
        for t in tr.tickets:
            m2 = MLP(SIZES); 
            sd = {k: v for k, v in t.state.items() if not k.endswith("_mask")}
            m2.load_state_dict(sd); m2.eval()
            taccs.append((m2(xt).argmax(1) == yt).float().mean().item())
    return acc, taccs, tr.sparsifier.exploration_rate(), sum(int(sp.mask.sum()) for sp in tr.sparsifier.groups[0].params)

import fastsparse as sparse
from fastsparse.algorithms.gems import GemMiner, EdgePopup
from fastsparse.recipes.score_search import search, finetune
from fastsparse.algorithms.pai import shuffle_masks
from fastsparse.core.masks import sparse_params, attach_mask
from fastsparse.experiments.models import MLP
res = {}
def add(k, v): res.setdefault(k, []).append(v); print(k, v, flush=True)
def acc(m, xt, yt):
    m.eval()
    with torch.no_grad(): return (m(xt).argmax(1) == yt).float().mean().item()
def itop(seed, grow):
    torch.manual_seed(seed); x, y, xt, yt = digits(); model = MLP(SIZES)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    total = 100 * math.ceil(len(x) / 64)
    eng = sparse.Sparsifier(model, opt, sparse.create("itop", sparsity=0.98, distribution="erk", freq=50, grow_score=grow), total_steps=total, seed=seed)
    def step_fn(s, p): opt.step(); opt.zero_grad()
    _train(model, opt, x, y, 100, seed, step_fn)
    return acc(model, xt, yt), eng.exploration_rate()
def rs(method, seed):
    torch.manual_seed(seed); x, y, xt, yt = digits(); model = MLP(SIZES)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    total = 100 * math.ceil(len(x) / 64)
    eng = sparse.Sparsifier(model, opt, sparse.create(method, sparsity=0.98, distribution="erk", drop_fraction=0.3, update=sparse.UpdateSchedule(freq=50, stop=0.75)), total_steps=total, seed=seed)
    def step_fn(s, p): opt.step(); opt.zero_grad()
    _train(model, opt, x, y, 100, seed, step_fn)
    return acc(model, xt, yt), eng.exploration_rate()
def gem(kind, seed):
    torch.manual_seed(seed); x, y, xt, yt = digits(); model = MLP(SIZES)
    alg = GemMiner(sparsity=0.9, iter_period=10) if kind == "gem" else EdgePopup(sparsity=0.9)
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
    search(model, alg, Loader(x, y, seed), loss, 101, lr=0.1, seed=seed)
    a0 = acc(model, xt, yt)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sps = sparse_params(model)
    sh = shuffle_masks([sp.mask for sp in sps], seed=seed)
    # shuffled: same frozen weights, shuffled masks
    w = {sp.name: sp.param.detach().clone() for sp in sps}
    masks = [sp.mask.clone() for sp in sps]
    with torch.no_grad():
        for sp, m in zip(sps, sh): sp.mask.copy_(m); sp.param.copy_(w[sp.name] * m)
    a_sh = acc(model, xt, yt)
    with torch.no_grad():
        for sp, m in zip(sps, masks): sp.mask.copy_(m); sp.param.copy_(w[sp.name] * m)
    finetune(model, Loader(x, y, seed + 100), loss, 100, lr=0.01)
    return a0, a_sh, acc(model, xt, yt)
torch.set_num_threads(1)
if sys.argv[1:] == ["gem"]:
    # GEM-MINER ticket fine-tuned vs a random mask with its per-layer counts (same signed-constant
    # weights) and vs its mask with re-initialised weights; all fine-tuned with the same protocol
    from test_gems import gem_vs_random
    for sparsity in (0.98, 0.9):
        for seed in (0, 1, 2):
            r = gem_vs_random(seed, sparsity, ft_lrs=(0.01, 0.1))
            add(f"gem{sparsity}_found", r["found"])
            for lr in (0.01, 0.1):
                for k, v in r[lr].items():
                    add(f"gem{sparsity}_ft{lr}_{k}", v)
    for k, v in res.items():
        print(k, round(statistics.fmean(v), 4), [round(a, 4) for a in v])
    sys.exit(0)
for seed in (0, 1, 2):
    t = time.time(); add("rigl98", rs("rigl", seed)); add("set98", rs("set", seed))
    add("itop_set98", itop(seed, "random")); add("itop_rigl98", itop(seed, "gradient"))
    add("sup_rigl98", sup(seed)[0]); add("sup_rigl98_cima", sup(seed, sup="cima")[0]); add("sup_set98", sup(seed, base="set")[0])
    add("static90", run("static", seed, sparsity=0.9).accuracy); add("rigl90", run("rigl", seed, sparsity=0.9).accuracy)
    add("gem90", gem("gem", seed)); add("ep90", gem("ep", seed))
    print("seed", seed, time.time() - t, flush=True)
print("SUMMARY")
for k, v in res.items():
    if isinstance(v[0], tuple):
        cols = list(zip(*v)); print(k, [round(statistics.fmean(c), 4) for c in cols], [[round(a, 4) for a in c] for c in cols])
    else:
        print(k, round(statistics.fmean(v), 4), [round(a, 4) for a in v])
