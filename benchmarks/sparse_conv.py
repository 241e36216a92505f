"""Could a 3x3 convolution train faster sparse? im2col with the compiled kernels against the
dense convolution with masks, on ResNet-20 and ResNet-18 (CIFAR-sized) layers.

The sparse path is the most favourable form measured in this project: activations kept as
(C, N, H, W), so that im2col is 9 shifted copies into a reused (C*9, N*H*W) buffer and the
output of the sparse product is already the next layer's input (no permutes; a real network
would also pay for converting its batch norms and shortcuts); the forward is CSR @ columns, the
input gradient the transposed product through ``perm`` and col2im (9 shifted adds), the gradient
of the values the sampled product, then SGD-momentum on the values; the column buffer and its gradient are reused across steps. The dense path is oneDNN's
convolution forward and backward, the faster of NCHW and channels_last, SGD-momentum and the
mask re-applied. Batch 128, stride 1, padding 1; every call interleaved, medians; the ratio is
dense time / sparse time (above 1: sparse faster).

    python benchmarks/sparse_conv.py                   # about 3 minutes on 2 cores

The last line is one JSON object with every ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from fastsparse.core import native
from fastsparse.core.csr import build_sparse

LAYERS = {   # name: (channels, spatial size)
    "ResNet-20 16→16 at 32×32": (16, 32), "ResNet-20 32→32 at 16×16": (32, 16),
    "ResNet-20 64→64 at 8×8": (64, 8), "ResNet-18 64→64 at 32×32": (64, 32),
    "ResNet-18 128→128 at 16×16": (128, 16), "ResNet-18 256→256 at 8×8": (256, 8),
    "ResNet-18 512→512 at 4×4": (512, 4),
}
LR, MOMENTUM = 0.01, 0.9


def sparse_step(C: int, N: int, H: int, st, values, momentum, x, gy, cols, gcols, gxp):
    """One training step of the sparse layer: forward, both gradients, SGD-momentum."""
    xp = F.pad(x, (1, 1, 1, 1))
    view = cols.view(C, 3, 3, N, H, H)
    for i in range(3):
        for j in range(3):
            view[:, i, j].copy_(xp[:, :, i:i + H, j:j + H])
    y = native.spmm(st.crow, st.col, values, cols)                      # (O, N*H*W): the next layer's CNHW
    g = gy.reshape(y.shape)
    gcols = native.spmm(st.crow_t, st.col_t, values, g, perm=st.perm, out=gcols).view(C, 3, 3, N, H, H)
    gxp.zero_()
    for i in range(3):
        for j in range(3):
            gxp[:, :, i:i + H, j:j + H].add_(gcols[:, i, j])
    gv = native.sddmm(st.crow, st.col, g, cols)
    momentum.mul_(MOMENTUM).add_(gv)
    values.add_(momentum, alpha=-LR)


def dense_step(conv_w, mask, momentum, x, gy):
    w = conv_w.detach().requires_grad_(True)
    xs = x.detach().requires_grad_(True)
    with torch.enable_grad():
        F.conv2d(xs, w, padding=1).backward(gy)
    momentum.mul_(MOMENTUM).add_(w.grad)
    conv_w.add_(momentum, alpha=-LR).mul_(mask)


def measure(C: int, H: int, sparsity: float, batch: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(C, C, 3, 3, generator=g) * 0.1
    mask = (torch.rand(C, C, 3, 3, generator=g) >= sparsity).float()
    values, st = build_sparse((w * mask).reshape(C, C * 9), mask.reshape(C, C * 9).bool())
    x_cnhw = torch.randn(C, batch, H, H, generator=g)
    gy_cnhw = torch.randn(C, batch, H, H, generator=g)
    cols, gcols = torch.empty(C * 9, batch * H * H), torch.empty(C * 9, batch * H * H)   # reused buffers
    gxp = torch.empty(C, batch, H + 2, H + 2)
    x_nchw, gy_nchw = x_cnhw.transpose(0, 1).contiguous(), gy_cnhw.transpose(0, 1).contiguous()
    x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
    gy_cl = gy_nchw.contiguous(memory_format=torch.channels_last)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    fns = {
        "sparse": lambda m=torch.zeros_like(values): sparse_step(C, batch, H, st, values, m, x_cnhw, gy_cnhw,
                                                                    cols, gcols, gxp),
        "dense NCHW": lambda m=torch.zeros_like(w): dense_step(w, mask, m, x_nchw, gy_nchw),
        "dense channels_last": lambda m=torch.zeros_like(w_cl): dense_step(w_cl, mask, m, x_cl, gy_cl),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            with torch.no_grad():
                fns[k]()
            times[k].append(1e3 * (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in times.items()}
    dense = min(med["dense NCHW"], med["dense channels_last"])
    return {"sparsity": sparsity, **{f"{k} ms": v for k, v in med.items()}, "ratio": dense / med["sparse"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", default="0.9,0.95,0.98")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not native.available():
        raise SystemExit(f"the compiled kernels are not available here: {native.status()}")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; kernels: "
          f"{native.status()}; batch {args.batch}; medians of {args.repeats}; dense time / sparse time")
    print(f"{'layer':<28}" + "".join(f"{s:>8.0%}" for s in sparsities))
    rows = {}
    for name, (C, H) in LAYERS.items():
        rows[name] = [measure(C, H, s, args.batch, args.repeats) for s in sparsities]
        print(f"{name:<28}" + "".join(f"{r['ratio']:>7.2f}x" for r in rows[name]), flush=True)
    print(json.dumps({"benchmark": "sparse_conv", "kernels": native.status(), "batch": args.batch, "rows": rows}))


if __name__ == "__main__":
    main()
