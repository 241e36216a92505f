"""The Hugging Face Trainer callback on a tiny GPT-2 (Conv1D) and a tiny Llama (Linear, grouped
k/v heads): exact per-layer and per-head counts, exact zeros, embeddings/norms/lm_head untouched,
mask updates inside Trainer.train, resumes bit-identical to an uninterrupted run, refusals."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")   # the Trainer needs it (both are in the dev extras)

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from fastsparse import EntryPointRefused, RigL, create
from fastsparse.core.masks import n_keep, sparse_params
from fastsparse.integrations.huggingface import STATE_FILE, SparseTrainerCallback, head_groups

STEPS, SAVE = 6, 3
RIGL = {"algorithm": "rigl", "sparsity": 0.9, "update": {"freq": 2, "stop": 0.9}}
GMP = {"algorithm": "gmp", "sparsity": 0.8, "freq": 1, "end": 0.5, "scope": "local"}
# hand-worked: uniform 0.9 keeps round(0.1 · n) per head group, times the groups
GPT2_COUNTS = {"attn.c_attn": 12 * 26, "attn.c_proj": 4 * 26, "mlp.c_fc": 410, "mlp.c_proj": 410}   # 3072/12, 1024/4
LLAMA_COUNTS = {"q_proj": 4 * 26, "k_proj": 2 * 26, "v_proj": 2 * 26, "o_proj": 4 * 26,
                "gate_proj": 205, "up_proj": 205, "down_proj": 205}


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


DATA = [{"input_ids": x, "labels": x} for x in torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))]


def fit(model, callback, out, steps=STEPS, resume=None, data=DATA) -> Trainer:
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=steps, save_steps=SAVE,
                             per_device_train_batch_size=4, logging_steps=1000, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def counts(model) -> dict[str, int]:
    return {sp.name: int(sp.mask.count_nonzero()) for sp in sparse_params(model)}


def expected(model, table) -> dict[str, int]:
    return {n: c for n, _ in model.named_parameters() for key, c in table.items() if f".{key}.weight" in n}


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make,table", [(gpt2, GPT2_COUNTS), (llama, LLAMA_COUNTS)], ids=["gpt2", "llama"])
def test_rigl_in_trainer_exact_counts_balanced_heads_and_bit_identical_resume(make, table, tmp_path):
    model, cb = make(), SparseTrainerCallback(RIGL)
    fit(model, cb, tmp_path)
    assert [h["step"] for h in cb.sparsifier.history] == [2, 4] and cb.sparsifier.history[0]["changed"] > 0
    assert counts(model) == expected(model, table)                      # exact, and only these weights
    for sp in sparse_params(model):
        assert torch.count_nonzero(sp.param[~sp.mask]) == 0            # exact zeros after training
        assert not any(part in sp.name for part in ("embed", "wte", "wpe", "norm", "ln_", "lm_head"))
    for name, (dim, g) in head_groups(model, list(counts(model))).items():
        mask = dict((sp.name, sp.mask) for sp in sparse_params(model))[name]
        per_head = mask.movedim(dim, 0).reshape(g, -1).sum(1)
        assert per_head.tolist() == [26] * g                           # every head keeps the same count
    assert (tmp_path / f"checkpoint-{SAVE}" / STATE_FILE).is_file()

    resumed, cb2 = make(), SparseTrainerCallback(RIGL)
    fit(resumed, cb2, tmp_path, resume=str(tmp_path / f"checkpoint-{SAVE}"))
    ours, theirs = state_of(model), state_of(resumed)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)   # masks and weights
    assert cb2.sparsifier.history == cb.sparsifier.history and cb2.sparsifier.step_count == STEPS


def test_gmp_in_trainer_reaches_exact_layer_counts_and_resumes(tmp_path):
    model, cb = llama(), SparseTrainerCallback(GMP)
    fit(model, cb, tmp_path)
    assert [h["step"] for h in cb.sparsifier.history] == [1, 2, 3]
    assert counts(model) == {sp.name: n_keep(sp.mask.numel(), 0.8) for sp in sparse_params(model)}
    assert set(counts(model)) == set(expected(model, LLAMA_COUNTS))   # no embedding, norm or lm_head
    assert all(torch.count_nonzero(sp.param[~sp.mask]) == 0 for sp in sparse_params(model))
    resumed = llama()
    fit(resumed, SparseTrainerCallback(GMP), tmp_path, resume=str(tmp_path / f"checkpoint-{SAVE}"))
    assert all(torch.equal(a, b) for a, b in zip(state_of(model).values(), state_of(resumed).values()))


def test_algorithm_object_gets_the_default_filter_and_runs_as_built(tmp_path):
    algorithm = RigL(sparsity=0.9, update=None)
    model = gpt2()
    fit(model, SparseTrainerCallback(algorithm), tmp_path, steps=2)
    assert algorithm.param_filter is None                              # the caller's object is left as it was
    assert counts(model) == {n: n_keep(p.numel(), 0.9) for n, p in model.named_parameters()
                             if n in expected(model, GPT2_COUNTS)}      # no head balancing for an object


def test_balance_heads_false_keeps_plain_layer_counts(tmp_path):
    model = llama()
    fit(model, SparseTrainerCallback(RIGL, balance_heads=False), tmp_path, steps=2)
    assert counts(model)["model.layers.0.self_attn.q_proj.weight"] == 102     # round(0.1 · 1024), not 4 · 26
    assert counts(model) == {sp.name: n_keep(sp.mask.numel(), 0.9) for sp in sparse_params(model)}


@pytest.mark.parametrize("sparsity", ["imp", {"algorithm": "suptickets"}, {"algorithm": "gem"}, "snip", "synflow",
                                      create("imp")], ids=str)
def test_methods_a_trainer_cannot_run_whole_are_refused(sparsity):
    with pytest.raises(EntryPointRefused):
        SparseTrainerCallback(sparsity)


def test_sparse_execution_and_impossible_balance_are_refused():
    with pytest.raises(EntryPointRefused, match="only 'masked'"):
        SparseTrainerCallback(RIGL, execution="sparse")
    with pytest.raises(ValueError, match="algorithm object runs"):
        SparseTrainerCallback(RigL(), balance_heads=True)


def test_corrupt_or_foreign_state_is_refused_before_any_mask_is_attached(tmp_path):
    fit(gpt2(), SparseTrainerCallback(RIGL), tmp_path, steps=SAVE)
    path = tmp_path / f"checkpoint-{SAVE}" / STATE_FILE
    good = path.read_bytes()
    with pytest.raises(ValueError, match="another sparsity config"):
        fit(gpt2(), SparseTrainerCallback({**RIGL, "sparsity": 0.8}), tmp_path, resume=str(path.parent))
    state = torch.load(path, weights_only=True)
    first = next(iter(state["masks"]))
    state["masks"][first][0, 0] ^= True                                  # one mask bit flipped, checksums kept
    torch.save(state, path)
    model = gpt2()
    with pytest.raises(ValueError, match=f"is corrupt: tensor 'masks/{first}' is corrupt"):
        fit(model, SparseTrainerCallback(RIGL), tmp_path, resume=str(path.parent))
    assert sparse_params(model) == []                                    # nothing attached
    raw = bytearray(good)
    raw[len(raw) // 2:] = b""                                            # a truncated file
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="truncated or not a fastsparse state"):
        fit(gpt2(), SparseTrainerCallback(RIGL), tmp_path, resume=str(path.parent))
    # same config and step, other data: checksums and identity hold, but the masks are not the weights'
    fit(gpt2(), SparseTrainerCallback(RIGL), tmp_path / "other", steps=SAVE, data=DATA[::-1])
    path.write_bytes((tmp_path / "other" / f"checkpoint-{SAVE}" / STATE_FILE).read_bytes())
    model = gpt2()
    with pytest.raises(ValueError, match="nonzero weights outside its saved mask"):
        fit(model, SparseTrainerCallback(RIGL), tmp_path, resume=str(path.parent))
    assert sparse_params(model) == []
    path.unlink()
    with pytest.raises(EntryPointRefused, match="missing"):
        fit(gpt2(), SparseTrainerCallback(RIGL), tmp_path, resume=str(path.parent))
