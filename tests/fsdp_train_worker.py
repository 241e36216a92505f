"""Worker of tests/test_train_fsdp.py (``torchrun --nproc_per_node 2``, gloo, CPU): the runner of
``fastsparse train`` with ``parallel: fsdp``: a whole run, the same run interrupted after epoch 2
and resumed from its checkpoint, and the run with ``parallel: ddp``. Rank 0 writes the run
folders under ``--out``; every rank writes ``rank<r>.json`` with what it saw."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

from fastsparse.experiments.runner import RunInterrupted, run

CFG = {"seed": 0, "epochs": 4, "device": "cpu", "model": {"name": "mlp", "sizes": [64, 128, 10]},
       "data": {"name": "digits", "batch_size": 32}, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
       "parallel": "fsdp",
       "sparsity": {"algorithm": "rigl", "sparsity": 0.9, "distribution": "erk", "update": {"freq": 10, "stop": 0.75}}}


def stop_after(epoch: int):
    def hook(e, metrics):
        if e == epoch:
            raise RunInterrupted(f"stopped after epoch {e}")
    return hook


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    code = 0
    try:
        seen = {}
        whole = run(CFG, os.path.join(args.out, "whole"), progress=False)
        try:
            run(CFG, os.path.join(args.out, "resumed"), progress=False, on_epoch_end=stop_after(2))
            seen["interrupted"] = False
        except RunInterrupted:
            seen["interrupted"] = True
        resumed = run(CFG, os.path.join(args.out, "resumed"), resume=True, progress=False)
        ddp = run({**CFG, "parallel": "ddp"}, os.path.join(args.out, "ddp"), progress=False)
        seen.update(whole=whole["run_dir"], resumed=resumed["run_dir"], ddp=ddp["run_dir"])
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)
    except BaseException:
        with open(os.path.join(args.out, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        dist.destroy_process_group()
    os._exit(code)


if __name__ == "__main__":
    main()
