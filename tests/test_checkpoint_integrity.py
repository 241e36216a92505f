"""What ``--resume`` loads (issue 13): nothing in a checkpoint runs; a checkpoint is verified for
integrity (checksums of every tensor and of the rest), identity (the run's config) and the engine's
invariants (mask counts, exact zeros) before anything changes; every refusal is one ResumeError
sentence naming what is wrong, and leaves the run folder exactly as it was."""
from __future__ import annotations

import builtins
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from fastsparse.core.integrity import IntegrityError, seal, verify
from fastsparse.experiments.runner import ResumeError, RunInterrupted, run

CFG = {
    "seed": 0,
    "data": {"name": "digits", "batch_size": 256},
    "model": {"name": "mlp", "sizes": [64, 32, 10]},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "epochs": 3,
    "sparsity": {"algorithm": "rigl", "sparsity": 0.9, "update": {"freq": 2, "stop": 0.75}},
}


def _interrupt_at(epoch):
    def stop(e, _m):
        if e == epoch:
            raise RunInterrupted()
    return stop


def _interrupted(out: Path, cfg=CFG) -> Path:
    with pytest.raises(RunInterrupted):
        run(cfg, out, progress=False, on_epoch_end=_interrupt_at(1))
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _interrupted(tmp_path_factory.mktemp("base") / "out")


@pytest.fixture
def run_dir(base, tmp_path) -> Path:
    shutil.copytree(base.parent, tmp_path / "out")
    return tmp_path / "out" / base.name


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def _refused(run_dir: Path, *words: str) -> str:
    """Resume ``run_dir``; expect a ResumeError containing ``words``, and the folder untouched."""
    before = _snapshot(run_dir)
    with pytest.raises(ResumeError) as info:
        run(CFG, run_dir.parent, progress=False, resume=True)
    message = str(info.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, message
    assert _snapshot(run_dir) == before, "a refused resume changed the run folder"
    return message


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def _write_sealed(run_dir: Path, state: dict) -> None:
    torch.save(seal(state), run_dir / "checkpoint.pt")


def _flip_in_file(run_dir: Path, tensor: torch.Tensor, byte_index: int, xor: int = 1) -> None:
    """Flip bits of one byte of ``tensor``'s stored bytes inside checkpoint.pt (found by content)."""
    path = run_dir / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    needle = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the tensor's bytes are not unique in the file"
    data[at + byte_index] ^= xor
    path.write_bytes(bytes(data))


# --- nothing in a checkpoint runs ---------------------------------------------------------------
class _Payload:
    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _payloads(marker: Path):
    return {
        "os.system": _Payload(os.system, (f"touch {marker}",)),
        "builtins.exec": _Payload(builtins.exec, (f"open({str(marker)!r}, 'w').write('ran')",)),
        "builtins.eval": _Payload(builtins.eval, (f"open({str(marker)!r}, 'w').write('ran')",)),
    }


@pytest.mark.parametrize("call", ["os.system", "builtins.exec", "builtins.eval"])
@pytest.mark.parametrize("where", ["top", "nested", "whole"])
def test_a_pickled_payload_is_refused_and_never_runs(run_dir, tmp_path, call, where):
    marker = tmp_path / "payload_ran"
    payload = _payloads(marker)[call]
    state = _state(run_dir)
    if where == "top":
        state["epoch"] = payload
    elif where == "nested":
        state["metrics"][0]["lr"] = payload
    else:
        state = payload
    torch.save(state, run_dir / "checkpoint.pt")
    _refused(run_dir, "checkpoint.pt holds a pickled", "nothing in it ran")
    assert not marker.exists(), "the payload ran"


def test_the_payload_does_not_run_through_export_either(run_dir, tmp_path):
    from fastsparse.deploy import export_command

    marker = tmp_path / "payload_ran"
    state = _state(run_dir)
    state["payload"] = _payloads(marker)["os.system"]
    torch.save(state, run_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match="cannot read"):
        export_command(str(run_dir), str(tmp_path / "m.safetensors"))
    assert not marker.exists()


def test_nothing_else_in_the_package_unpickles():
    """Every torch.load in the package is weights-only, and pickle is used by one reader alone,
    through its restricted unpickler: the CIFAR reader (DCP's pickled ``.metadata`` is never read:
    sharded checkpoints carry it as JSON in their manifest)."""
    root = Path(__file__).resolve().parents[1] / "fastsparse"
    restricted = {"data.py"}
    for path in root.rglob("*.py"):
        text = path.read_text()
        for line in text.splitlines():
            if "torch.load(" in line and not line.lstrip().startswith(("#", '"')):
                assert "weights_only=True" in line, f"{path.name}: {line.strip()}"
        if "pickle" in text and path.name not in restricted:
            assert "import pickle" not in text and "pickle.load" not in text, path
    for path in (root / "experiments" / "data.py",):
        text = path.read_text()
        assert "pickle.load(" not in text and "pickle.loads(" not in text
        assert "(pickle.Unpickler)" in text and "def find_class" in text


# --- integrity ------------------------------------------------------------------------------------
def test_an_intact_checkpoint_resumes(run_dir):
    run(CFG, run_dir.parent, progress=False, resume=True)
    assert (run_dir / "summary.json").is_file() and not (run_dir / "run.lock").exists()
    assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("key, index", [("model/0.weight_mask", None), ("model/0.weight", None),
                                        ("optimizer/state/0/momentum_buffer", None), ("model/2.bias", None)])
def test_one_flipped_byte_in_a_tensor_names_that_tensor(run_dir, key, index):
    state = _state(run_dir)
    node = state
    for part in key.split("/"):
        node = node[int(part)] if isinstance(node, dict) and part.isdigit() and int(part) in node else node[part]
    tensor = node
    if tensor.dtype == torch.bool:
        byte = int((~tensor.reshape(-1)).nonzero()[7])   # an inactive entry: 0x00 -> 0x01, one more active weight
    else:
        byte = int(tensor.reshape(-1).nonzero()[3]) * tensor.element_size()   # the low byte of a nonzero value
    _flip_in_file(run_dir, tensor, byte)
    _refused(run_dir, f"tensor '{key}' is corrupt", "delete it to start the run over")


def test_export_refuses_a_corrupt_checkpoint(run_dir, tmp_path):
    from fastsparse.deploy import export_command

    state = _state(run_dir)
    _flip_in_file(run_dir, state["model"]["0.weight"], 1)
    with pytest.raises(ValueError, match="is corrupt: tensor 'model/0.weight'"):
        export_command(str(run_dir), str(tmp_path / "m.safetensors"))
    assert not (tmp_path / "m.safetensors").exists()


def test_a_changed_counter_is_detected(run_dir):
    state = _state(run_dir)
    state["epoch"] = 2            # plain data, not resealed
    torch.save(state, run_dir / "checkpoint.pt")
    _refused(run_dir, "plain data", "differs from the checksum")


def test_a_changed_byte_in_the_plain_data_of_the_file_is_detected(run_dir):
    state = _state(run_dir)
    path = run_dir / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    lr = struct.pack(">d", state["metrics"][0]["lr"])      # pickle stores floats big-endian
    at = data.find(lr)
    assert at >= 0
    data[at + 7] ^= 1
    path.write_bytes(bytes(data))
    _refused(run_dir, "corrupt")


def test_a_truncated_checkpoint_is_refused(run_dir):
    path = run_dir / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _refused(run_dir, "is truncated or not a checkpoint")


def test_an_empty_checkpoint_is_refused(run_dir):
    (run_dir / "checkpoint.pt").write_bytes(b"")
    _refused(run_dir, "is empty (0 bytes)")


def test_a_file_that_is_no_checkpoint_is_refused(run_dir):
    (run_dir / "checkpoint.pt").write_bytes(os.urandom(4096))
    _refused(run_dir, "is truncated or not a checkpoint")


def test_a_checkpoint_without_checksums_is_refused(run_dir):
    state = _state(run_dir)
    del state["integrity"]
    torch.save(state, run_dir / "checkpoint.pt")
    _refused(run_dir, "has no checksums")


@pytest.mark.parametrize("change, words", [
    (lambda s: s.update(extra=1), "has unknown ['extra']"),
    (lambda s: s.pop("optimizer"), "lacks ['optimizer']"),
    (lambda s: s.pop("mask_counts"), "lacks ['mask_counts']"),
    (lambda s: s.update(epoch="1"), "'epoch' is a str"),
    (lambda s: s.update(phase=5), "phase 5, epoch 1 lie outside"),
    (lambda s: s.update(epoch=7), "phase 0, epoch 7 lie outside"),
    (lambda s: s["model"].pop("2.bias"), "lacks ['2.bias']"),
    (lambda s: s["model"].update({"9.weight": torch.zeros(2)}), "has ['9.weight'], which the model lacks"),
    (lambda s: s["model"].update({"2.bias": torch.zeros(11)}), "2.bias: shape (11,) in the checkpoint"),
    (lambda s: s["model"].update({"2.bias": torch.zeros(10, dtype=torch.float64)}), "2.bias: dtype torch.float64"),
    (lambda s: s["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3)),
     "optimizer state momentum_buffer of parameter 0: shape (3,)"),
])
def test_a_resealed_checkpoint_with_the_wrong_keys_or_shapes_is_refused(run_dir, change, words):
    state = _state(run_dir)
    change(state)
    _write_sealed(run_dir, state)
    _refused(run_dir, words)


# --- invariants (checked even when the checksums were rewritten) --------------------------------
def test_a_mask_with_one_more_active_weight_than_recorded_is_refused(run_dir):
    state = _state(run_dir)
    mask = state["model"]["0.weight_mask"]
    recorded = state["mask_counts"]["0.weight_mask"]
    assert int(mask.sum()) == recorded
    flat = mask.view(-1)
    flat[int((~flat).nonzero()[0])] = True
    _write_sealed(run_dir, state)
    _refused(run_dir, f"mask 0.weight_mask has {recorded + 1:,} active weights, the engine recorded {recorded:,}")


def test_a_nonzero_weight_outside_its_mask_is_refused(run_dir):
    state = _state(run_dir)
    w, mask = state["model"]["2.weight"], state["model"]["2.weight_mask"]
    w.view(-1)[int((~mask.view(-1)).nonzero()[0])] = 1e-30
    _write_sealed(run_dir, state)
    _refused(run_dir, "2.weight has 1 nonzero weights outside its mask")


# --- identity ---------------------------------------------------------------------------------------
def test_a_same_shape_checkpoint_of_another_config_is_refused_with_the_differences(run_dir, tmp_path):
    other_cfg = {**CFG, "optimizer": {**CFG["optimizer"], "lr": 0.05}}
    other = _interrupted(tmp_path / "other", other_cfg)
    shutil.copy(other / "checkpoint.pt", run_dir / "checkpoint.pt")
    _refused(run_dir, "belongs to a run of another config", "optimizer.lr: 0.05 -> 0.1")


def test_another_configs_checkpoint_relabelled_with_this_hash_is_still_refused(run_dir, tmp_path):
    other_cfg = {**CFG, "seed": 1}
    other = _interrupted(tmp_path / "other", other_cfg)
    state = _state(other)
    state["config_hash"] = _state(run_dir)["config_hash"]
    _write_sealed(run_dir, state)
    _refused(run_dir, "belongs to a run of another config", "seed: 1 -> 0")


# --- the checksums as pure functions ----------------------------------------------------------------
def test_seal_and_verify_round_trip_and_tell_types_apart():
    state = {"a": 1, "b": [1.0, "x"], "t": torch.arange(4), "n": None, "d": {"k": (True,)}}
    verify(seal(state))
    for changed in ({**state, "a": 1.0}, {**state, "a": True}, {**state, "b": (1.0, "x")},
                    {**state, "b": [1.0, "x", None]}, {**state, "d": {"k2": (True,)}},
                    {**state, "t": torch.arange(4).float()}, {**state, "t": torch.arange(4).view(2, 2)}):
        sealed = seal(state)
        tampered = {**changed, "integrity": sealed["integrity"]}
        with pytest.raises(IntegrityError):
            verify(tampered)


def test_a_renamed_tensor_is_named():
    sealed = seal({"model": {"w": torch.ones(3)}})
    sealed["model"] = {"v": torch.ones(3)}
    with pytest.raises(IntegrityError, match="'model/w' missing; 'model/v' not in its checksums"):
        verify(sealed)


def test_verify_refuses_a_malformed_record():
    for record in (None, "x", {"format": 2, "tensors": {}, "digest": ""}, {"format": 1, "tensors": [], "digest": ""}):
        with pytest.raises(IntegrityError):
            verify({"a": 1, "integrity": record})
