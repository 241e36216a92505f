"""Speed of fastsparse's CSR Linear against dense F.linear, per sparsity and batch size.

    python benchmarks/inference.py                      # 4096x4096, 80..99 %, batch 1/16/128
    python benchmarks/inference.py --size 1024 --threads 2 --reps 9

For each sparsity and batch size it prints medians of interleaved runs of
    dense      F.linear(x, W, b) with the (mostly zero) dense weight,
    fastsparse SparseLinear (CSR, int32 indices; the compiled kernels from 16 rows, torch.addmm below),
    reference  torch.sparse.mm on W.to_sparse_csr() (default int64 indices) plus the bias,
the speedups over dense, and the FLOP ratio 1 / (1 - s), the speedup a perfect sparse
kernel would reach. The last line is the lowest sparsity at which SparseLinear beat
dense at every batch size: a threshold for ``to_inference(model, threshold=...)`` on
the machine it ran on.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fastsparse.deploy.inference import SparseLinear, measure  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="the layer is size x size (default 4096)")
    ap.add_argument("--sparsities", default="0.8,0.9,0.95,0.98,0.99")
    ap.add_argument("--batches", default="1,16,128")
    ap.add_argument("--reps", type=int, default=7, help="interleaved samples per median (default 7)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sparsities = sorted(float(s) for s in args.sparsities.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    n = args.size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), layer {n}x{n} fp32 with bias, "
          f"medians of {args.reps} interleaved samples")
    head = (f"{'sparsity':>8} {'batch':>5} {'dense ms':>9} {'fastsparse ms':>13} {'speedup':>8} "
            f"{'torch.sparse.mm ms':>18} {'speedup':>8} {'FLOP ratio':>10}")
    print(head)
    print("-" * len(head))
    g = torch.Generator().manual_seed(args.seed)
    threshold = None
    for s in sparsities:
        w = torch.randn(n, n, generator=g)
        w *= torch.rand(n, n, generator=g) >= s
        b = torch.randn(n, generator=g)
        fast = SparseLinear(w, b)
        ref_csr = w.to_sparse_csr()
        wins = True
        for batch in batches:
            x = torch.randn(batch, n, generator=g)
            t = measure({
                "dense": lambda: F.linear(x, w, b),
                "fastsparse": lambda: fast(x),
                "reference": lambda: torch.sparse.mm(ref_csr, x.t()).t() + b,
            }, reps=args.reps)
            wins &= t["fastsparse"] < t["dense"]
            print(f"{s:>8.0%} {batch:>5} {t['dense'] * 1e3:>9.3f} {t['fastsparse'] * 1e3:>13.3f} "
                  f"{t['dense'] / t['fastsparse']:>7.2f}x {t['reference'] * 1e3:>18.3f} "
                  f"{t['dense'] / t['reference']:>7.2f}x {1 / (1 - s):>9.0f}x", flush=True)
        if wins and threshold is None:
            threshold = s
        elif not wins:
            threshold = None
    if threshold is None:
        print("SparseLinear was not faster than dense at every batch size at the highest sparsity measured")
    else:
        print(f"SparseLinear beat dense at every batch size from {threshold:.0%} sparsity up: "
              f"to_inference(model, threshold={threshold}) on this machine")


if __name__ == "__main__":
    main()
