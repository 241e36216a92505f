"""The compiled kernels of sparse execution against torch's (MKL) and against the dense layer.

One (out, in) = 4096 x 4096 linear layer, batch 128, float32, at each sparsity: the three
products of a training step timed alone (forward ``W x``, input gradient ``W^T g``, weight
gradient sampled at the pattern), with the compiled kernels (fastsparse/core/native.py), with
torch's CSR kernels (``native.turned_off()``, the fallback) and, for the dense layer, torch's
dense matmuls. Then a whole step of the layer (forward and backward of a SparseLinear, and of a
masked nn.Linear). Every call is interleaved with the others, figures are medians.

    python benchmarks/native_kernels.py                       # about 1 minute on 2 cores
    python benchmarks/native_kernels.py --sparsities 0.9 --repeats 30

The last line is one JSON object with every median (milliseconds).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

from fastsparse.core import native
from fastsparse.core.sparse_linear import SparseLinear, forward_torch, grad_values_torch, grad_x_torch


def torch_products(layer: SparseLinear, x_t: torch.Tensor, g_t: torch.Tensor) -> dict:
    """The fallback's three products, the functions SparseLinearFn runs without the compiled kernels."""
    st, values = layer.structure, layer.values.detach()
    return {"forward": lambda: forward_torch(st, values, x_t, None),
            "grad_x": lambda: grad_x_torch(st, values, g_t),
            "grad_w": lambda: grad_values_torch(st, g_t, x_t)}


def measure(sparsity: float, size: int, batch: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    dense = nn.Linear(size, size)
    mask = torch.rand(size, size, generator=g) >= sparsity
    layer = SparseLinear.from_dense(dense, mask)
    st, values = layer.structure, layer.values.detach()
    x = torch.randn(batch, size, generator=g)
    x_t, g_t = x.t().contiguous(), torch.randn(size, batch, generator=g)
    masked = nn.Linear(size, size)
    w, gy = masked.weight.detach(), g_t.t().contiguous()
    fns = {
        "native forward": lambda: native.spmm(st.crow, st.col, values, x_t),
        "native grad_x": lambda: native.spmm(st.crow_t, st.col_t, values, g_t, perm=st.perm),
        "native grad_w": lambda: native.sddmm(st.crow, st.col, g_t, x_t),
        **{f"torch {k}": f for k, f in torch_products(layer, x_t, g_t).items()},
        "dense forward": lambda: x @ w.t(),
        "dense grad_x": lambda: gy @ w,
        "dense grad_w": lambda: gy.t() @ x,
    }

    def step(module, off: bool):
        def run():
            xs = x.clone().requires_grad_(True)
            if off:
                with native.turned_off():
                    module(xs).sum().backward()
            else:
                module(xs).sum().backward()
            if isinstance(module, nn.Linear):
                module.weight.grad.mul_(mask)   # the masked step's extra pass
            module.zero_grad(set_to_none=True)
        return run
    fns.update({"step native": step(layer, False), "step torch": step(layer, True), "step masked": step(masked, False)})
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()                                                  # warm-up
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append(1e3 * (time.perf_counter() - t))
    return {"sparsity": sparsity, **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; kernels: "
          f"{native.status()}; {args.size}x{args.size} layer, batch {args.batch}; medians of {args.repeats} "
          f"interleaved calls, ms")
    if not native.available():
        raise SystemExit(f"the compiled kernels are not available here: {native.status()}")
    rows = []
    print(f"{'sparsity':>8} {'product':>8} {'native':>8} {'torch':>8} {'dense':>8} {'torch/native':>12}")
    for s in (float(v) for v in args.sparsities.split(",")):
        row = measure(s, args.size, args.batch, args.repeats)
        rows.append(row)
        for k in ("forward", "grad_x", "grad_w"):
            n, t, d = row[f"native {k}"], row[f"torch {k}"], row[f"dense {k}"]
            print(f"{s:>8.0%} {k:>8} {n:>8.2f} {t:>8.2f} {d:>8.2f} {t / n:>11.2f}x")
        n, t, d = row["step native"], row["step torch"], row["step masked"]
        print(f"{s:>8.0%} {'step':>8} {n:>8.2f} {t:>8.2f} {d:>8.2f} {t / n:>11.2f}x  "
              f"(masked / native {d / n:.2f}x)", flush=True)
    print(json.dumps({"benchmark": "native_kernels", "kernels": native.status(), "size": args.size,
                      "batch": args.batch, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
