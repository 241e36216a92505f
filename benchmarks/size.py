"""File size of compressed sparse checkpoints against the dense fp32 state dict.

    python benchmarks/size.py                 # 4096x4096 Linear and MLP 784-300-100-10

For each model and sparsity (50, 90, 95, 99 %; uniform masks on every weight, biases
dense) it saves the model with ``save_sparse`` in each format and prints
file bytes / dense fp32 bytes (the dense tensors' bytes, masks excluded), next to the
same ratio for ``torch.save`` of the state dict (dense weights plus bool masks), which is
what a pruning library usually leaves on disk.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fastsparse as sparse  # noqa: E402
from fastsparse.deploy import save_sparse, size_report  # noqa: E402
from fastsparse.experiments.models import MLP  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.5,0.9,0.95,0.99")
    ap.add_argument("--size", type=int, default=4096, help="the single layer is size x size")
    args = ap.parse_args()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    models = {
        f"Linear {args.size}x{args.size}": lambda: nn.Linear(args.size, args.size),
        "MLP 784-300-100-10": lambda: MLP([784, 300, 100, 10]),
    }
    head = (f"{'model':<22} {'sparsity':>8} {'dense fp32':>11} {'auto':>7} {'chosen':<12} "
            f"{'bitmask':>8} {'csr':>7} {'torch.save':>10}")
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory() as tmp:
        for label, make in models.items():
            for s in sparsities:
                torch.manual_seed(0)
                model = make()
                sparse.sparsify_model(model, s).remove()
                ratios, chosen = {}, ""
                for fmt in ("auto", "bitmask", "csr"):
                    path = os.path.join(tmp, f"{fmt}.safetensors")
                    save_sparse(model, path, format=fmt)
                    report = size_report(path)
                    ratios[fmt] = report.ratio
                    if fmt == "auto":
                        chosen = "+".join(sorted({r.kind for r in report.rows if r.kind != "dense"}))
                dense_bytes = report.dense_fp32_bytes
                torch.save(model.state_dict(), os.path.join(tmp, "dense.pt"))
                pt_ratio = os.path.getsize(os.path.join(tmp, "dense.pt")) / dense_bytes
                print(f"{label:<22} {s:>8.0%} {dense_bytes / 2**20:>8.2f} MiB {ratios['auto']:>6.3f}x "
                      f"{chosen:<12} {ratios['bitmask']:>7.3f}x {ratios['csr']:>6.3f}x {pt_ratio:>9.3f}x",
                      flush=True)


if __name__ == "__main__":
    main()
