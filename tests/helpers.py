"""Small models and doubles shared by every test module."""
from __future__ import annotations

import torch
from torch import nn


def mlp(sizes=(8, 16, 12, 4), bias=True) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """conv(1->4, 3x3) + BN + linear(4*4*4 -> 10): a conv and a linear layer with a norm between."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


class AttnNet(nn.Module):
    """An embedding, a MultiheadAttention block, a LayerNorm and a head."""

    def __init__(self, vocab=20, dim=16, heads=4, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        x = self.embedding(tokens)
        x = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        return self.head(x.mean(1))


def batch(model_in=8, n=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model_in, generator=g), torch.randint(0, classes, (n,), generator=g)


def train_steps(model, opt, steps, x, y, after_step=None):
    loss_f = nn.CrossEntropyLoss()
    for i in range(steps):
        opt.zero_grad()
        loss_f(model(x), y).backward()
        opt.step()
        if after_step is not None:
            after_step(i)


def one_layer(shape) -> nn.Module:
    """A Linear (2-D shape) or Conv2d (4-D shape) layer whose weight has ``shape``."""
    if len(shape) == 2:
        return nn.Linear(shape[1], shape[0])
    return nn.Conv2d(shape[1], shape[0], tuple(shape[2:]))


def layer_input(shape, g: torch.Generator):
    """A small input batch for :func:`one_layer` of ``shape``."""
    if len(shape) == 2:
        return torch.randn(3, shape[1], generator=g)
    return torch.randn(2, shape[1], shape[2] + 1, shape[3] + 1, generator=g)


# --- several processes: a test launches torchrun, a worker ends through finish() ------------------

def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(worker: str, args: list[str], ranks: int = 2, timeout: float = 120) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``worker`` run on ``ranks`` processes (gloo, one thread
    each, this folder and the repository importable). A launch that outlives ``timeout`` is a hang:
    it is killed with all its workers (a session of its own) and the test fails."""
    import os
    import signal
    import subprocess
    import sys

    import pytest

    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), worker, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=here,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} did not finish in {timeout} s (a hang)\nstdout:\n{stdout[-3000:]}\n"
                    f"stderr:\n{stderr[-5000:]}")
    return proc.returncode, stdout, stderr


def rank_results(worker: str, args: list[str], out_dir, ranks: int = 2, prefix: str = "", timeout: float = 120) -> list:
    """Launch ``worker`` and read back what each rank saved as ``<out_dir>/<prefix>rank<r>.pt``; a
    rank that wrote ``.err`` instead, or wrote nothing, fails the test with the workers' output."""
    import pytest

    code, stdout, stderr = torchrun(worker, args, ranks, timeout)
    errors = {r: (out_dir / f"{prefix}rank{r}.err").read_text() for r in range(ranks)
              if (out_dir / f"{prefix}rank{r}.err").exists()}
    missing = [r for r in range(ranks) if not (out_dir / f"{prefix}rank{r}.pt").exists()]
    if errors or missing or code != 0:
        pytest.fail(f"torchrun {' '.join(args)}: exit {code}, ranks without results {missing}\n"
                    f"worker errors: {errors}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}")
    return [torch.load(out_dir / f"{prefix}rank{r}.pt", weights_only=True) for r in range(ranks)]


def finish(body, err_path: str) -> None:
    """A torchrun worker's end: run ``body``; if it fails, write its traceback to ``err_path``.
    Then flush, leave the process group (only after a success: a failed rank's peers may be gone)
    and exit at once, since torch's own teardown sometimes aborts a worker."""
    import os
    import sys
    import traceback

    import torch.distributed as dist

    code = 0
    try:
        body()
    except BaseException:
        with open(err_path, "w") as f:
            f.write(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        dist.destroy_process_group()
    os._exit(code)
