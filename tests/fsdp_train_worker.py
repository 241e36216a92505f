"""Worker of tests/test_train_fsdp.py (``torchrun --nproc_per_node 2``, gloo, CPU): the runner of
``fastsparse train`` with ``parallel: fsdp``, which writes sharded checkpoints (``checkpoint.dcp``):

* a whole run;
* the same run interrupted after epoch 2, then left as a process killed between the two renames
  of a checkpoint write leaves it (only ``checkpoint.dcp.old``, and a half-written
  ``checkpoint.dcp.tmp``), then resumed;
* before that resume, ``fastsparse train --resume`` (the CLI, in this process group) on two copies
  of the interrupted run folder: one with a flipped byte in rank 1's shard, one holding the
  checkpoint of another config (seed 1, interrupted after epoch 1); the exit code, the output
  and a digest of every file of the folder before and after are recorded;
* the run with ``parallel: ddp``;
* GraNet (global) for 2 epochs, whole and interrupted after epoch 1, then resumed.

Rank 0 writes the run folders under ``--out``; every rank writes ``rank<r>.json`` with what it saw."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from fastsparse.experiments.runner import RunInterrupted, run
from helpers import finish

CFG = {"seed": 0, "epochs": 4, "device": "cpu", "model": {"name": "mlp", "sizes": [64, 128, 10]},
       "data": {"name": "digits", "batch_size": 32}, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
       "parallel": "fsdp",
       "sparsity": {"algorithm": "rigl", "sparsity": 0.9, "distribution": "erk", "update": {"freq": 10, "stop": 0.75}}}


GRANET = {**CFG, "epochs": 2, "sparsity": {"algorithm": "granet", "sparsity": 0.9, "scope": "global", "freq": 5,
                                          "end": 0.75}}


def stop_after(epoch: int):
    def hook(e, metrics):
        if e == epoch:
            raise RunInterrupted(f"stopped after epoch {e}")
    return hook


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes (the lock file aside: a run rewrites it)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "run.lock":
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def cli_resume(config: Path, out: Path) -> dict:
    from typer.testing import CliRunner

    from fastsparse.experiments.cli import app

    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    before = folder_digest(run_dir)
    dist.barrier()
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(out), "--resume", "--quiet"])
    dist.barrier()
    return {"code": result.exit_code, "output": result.output, "unchanged": folder_digest(run_dir) == before}


def interrupted(cfg: dict, out: str, after: int) -> bool:
    try:
        run(cfg, out, progress=False, on_epoch_end=stop_after(after))
    except RunInterrupted:
        return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()

    def body():
        import yaml

        out = Path(args.out)
        seen = {}
        whole = run(CFG, out / "whole", progress=False)
        seen["interrupted"] = interrupted(CFG, out / "resumed", 2) and interrupted({**CFG, "seed": 1}, out / "other", 1)
        (run_dir,) = [p for p in (out / "resumed").iterdir() if p.is_dir()]
        (other_dir,) = [p for p in (out / "other").iterdir() if p.is_dir()]
        config = out / "fsdp.yaml"
        if rank == 0:
            config.write_text(yaml.safe_dump(CFG))
            shutil.copytree(run_dir, out / "corrupt" / run_dir.name)
            shard = out / "corrupt" / run_dir.name / "checkpoint.dcp" / "__1_0.distcp"
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0x01
            shard.write_bytes(bytes(data))
            shutil.copytree(run_dir, out / "foreign" / run_dir.name)
            shutil.rmtree(out / "foreign" / run_dir.name / "checkpoint.dcp")
            shutil.copytree(other_dir / "checkpoint.dcp", out / "foreign" / run_dir.name / "checkpoint.dcp")
            # as a process killed between the renames of a checkpoint write leaves the folder
            os.replace(run_dir / "checkpoint.dcp", run_dir / "checkpoint.dcp.old")
            (run_dir / "checkpoint.dcp.tmp").mkdir()
            (run_dir / "checkpoint.dcp.tmp" / "__0_0.distcp").write_bytes(b"half written")
        dist.barrier()
        first_two = (run_dir / "metrics.jsonl").read_text().splitlines()
        seen["corrupt"] = cli_resume(config, out / "corrupt")
        seen["foreign"] = cli_resume(config, out / "foreign")
        resumed = run(CFG, out / "resumed", resume=True, progress=False)
        # the first two epochs kept as they were (their timings too): resumed, not trained again
        seen["kept"] = (run_dir / "metrics.jsonl").read_text().splitlines()[:2] == first_two and len(first_two) == 2
        seen["leftovers"] = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint"))
        ddp = run({**CFG, "parallel": "ddp"}, out / "ddp", progress=False)
        granet = run(GRANET, out / "granet", progress=False)
        seen["interrupted"] &= interrupted(GRANET, out / "granet_resumed", 1)
        granet_resumed = run(GRANET, out / "granet_resumed", resume=True, progress=False)
        seen.update(whole=whole["run_dir"], resumed=resumed["run_dir"], ddp=ddp["run_dir"], granet=granet["run_dir"],
                    granet_resumed=granet_resumed["run_dir"])
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)

    finish(body, os.path.join(args.out, f"rank{rank}.err"))


if __name__ == "__main__":
    main()
