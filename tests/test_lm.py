"""The language-model example: Python's own pydoc text as bytes, a small GPT, RigL with balanced
heads, perplexity in the metrics, run through the CLI for a few steps."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastsparse.core.masks import sparse_params
from fastsparse.experiments.cli import app
from fastsparse.experiments.data import dataset_info, load_dataset
from fastsparse.experiments.metrics import evaluate
from fastsparse.experiments.models import create_model
from fastsparse.experiments.text import corpus_bytes, windows

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pydoc_gpt_rigl.yaml"
QUICK = ["--set", "data.train_size=64", "--set", "data.test_size=16", "--set", "epochs=2",
         "--set", "sparsity.update.freq=1"]


def test_windows_are_next_byte_targets_and_splits_do_not_overlap():
    x, y = windows(torch.arange(10), 4, 4)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    data = load_dataset("pydoc_topics", context=32)
    raw = corpus_bytes()
    cut = int(len(raw) * 0.9)
    assert bytes(data.x_train[0].tolist()) == raw[:32] and bytes(data.x_test[0].tolist()) == raw[cut:cut + 32]
    assert len(data.x_train) == (cut - 1) // 32 and data.num_classes == 256
    assert dataset_info("pydoc_topics", context=32) == ((32,), 256)


def test_gpt_is_causal_and_its_test_loss_is_per_token():
    torch.manual_seed(0)
    model = create_model("gpt", (8,), 256, dim=16, depth=1, heads=2)
    x = torch.randint(0, 256, (3, 8))
    changed = x.clone()
    changed[:, 5:] = 0
    out, out2 = model(x), model(changed)
    assert out.shape == (3, 256, 8) and torch.equal(out[..., :5], out2[..., :5])   # no peeking ahead
    data = load_dataset("pydoc_topics", context=8, train_size=4, test_size=5)
    loss, acc = evaluate(model, data)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(data.x_test), data.y_test)
    assert loss == pytest.approx(float(expected), rel=1e-5) and 0 <= acc <= 1


def test_example_runs_through_the_cli_sparse_and_dense(tmp_path):
    result = CliRunner().invoke(app, ["train", str(EXAMPLE), "--out", str(tmp_path), "--quiet", *QUICK])
    assert result.exit_code == 0, result.output
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["test_perplexity"] == pytest.approx(math.exp(summary["test_loss"]))
    # 4 steps, an update every step before stop = 0.75 · 4: steps 1 and 2
    assert summary["mask_updates"] == 2 and summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
    saved = torch.load(next(tmp_path.glob("*/model.pt")), weights_only=True)
    masks = {k: v for k, v in saved.get("model", saved).items() if k.endswith("_mask")}
    assert len(masks) == 12 and not any("embed" in k or "lm_head" in k for k in masks)
    for layer in (0, 1):                                 # every head keeps the same count (4 heads of 16)
        for proj, dim in (("q", 0), ("k", 0), ("v", 0), ("out", 1)):
            per_head = masks[f"layers.{layer}.attn.{proj}.weight_mask"].movedim(dim, 0).reshape(4, -1).sum(1)
            assert per_head.tolist() == [137] * 4          # round(0.1338 · 1024) under ERK at 90%
    lines = [json.loads(x) for x in next(tmp_path.glob("*/metrics.jsonl")).read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and all("test_perplexity" in m for m in lines)
    dense = CliRunner().invoke(app, ["train", str(EXAMPLE), "--out", str(tmp_path / "dense"), "--quiet", *QUICK,
                                     "--set", "sparsity=null"])
    assert dense.exit_code == 0, dense.output
    assert json.loads(next((tmp_path / "dense").glob("*/summary.json")).read_text())["sparsity"] == 0.0
