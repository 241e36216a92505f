"""The compiled kernels of sparse execution (fastsparse/core/native.py): every instruction set
against a dense reference, independence of the thread count, the use by SparseLinear, and the
fallback to torch's kernels with its reason."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastsparse.core import native
from fastsparse.core.csr import build_sparse
from fastsparse.core.sparse_linear import SparseLinear


@pytest.fixture
def fresh(monkeypatch):
    """The kernels reloaded under the test's environment, and reloaded again afterwards."""
    for key in (native.ENV_SWITCH, native.ENV_ISA, native.ENV_CACHE, "CXX"):
        monkeypatch.delenv(key, raising=False)
    native._reset_for_tests()
    yield monkeypatch
    monkeypatch.undo()
    native._reset_for_tests()


def machine_isa() -> int:
    native._reset_for_tests()
    assert native.available(), native.status()
    return native._isa


def pattern(rows: int, cols: int, density: float, idx: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    mask[rows // 2] = False                                   # an empty row
    W = torch.randn(rows, cols, generator=g) * mask
    values, st = build_sparse(W, mask, idx)
    return W, mask, values, st


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("idx", [torch.int32, torch.int64])
def test_every_instruction_set_matches_the_dense_products(fresh, isa, idx):
    best = machine_isa()
    fresh.setenv(native.ENV_ISA, isa)
    native._reset_for_tests()
    want = min(best, {v: k for k, v in native.ISA_NAMES.items()}[isa])
    assert native.status() == f"native ({native.ISA_NAMES[want]})"
    # every chunk width and a masked tail; the last two pack the wide operand (N > 256 and each of
    # its rows read by at least 16 nonzeros on average), 700 with a partial last block
    shapes = [(37, 53, 0.3, n) for n in (1, 5, 16, 100, 128, 129, 300)] + [(200, 20, 0.5, 300), (200, 20, 0.5, 700)]
    for rows, cols, density, n in shapes:
        W, mask, values, st = pattern(rows, cols, density, idx, seed=n)
        if n > 256:
            assert (values.numel() >= 16 * cols) == (rows == 200)
        x, g = torch.randn(cols, n), torch.randn(rows, n)
        bias = torch.randn(rows)
        torch.testing.assert_close(native.spmm(st.crow, st.col, values, x, bias), W @ x + bias[:, None],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(native.spmm(st.crow, st.col, values, x), W @ x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(native.spmm(st.crow_t, st.col_t, values, g, perm=st.perm), W.t() @ g,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(native.sddmm(st.crow, st.col, g, x), (g @ x.t())[mask], rtol=1e-5, atol=1e-4)


def test_an_empty_pattern_gives_the_bias_and_no_values(fresh):
    W, mask, values, st = pattern(8, 6, 0.0, torch.int32, seed=0)
    assert values.numel() == 0
    bias = torch.randn(8)
    assert torch.equal(native.spmm(st.crow, st.col, values, torch.randn(6, 4), bias), bias[:, None].expand(8, 4))
    assert native.sddmm(st.crow, st.col, torch.randn(8, 4), torch.randn(6, 4)).numel() == 0


def test_results_do_not_depend_on_the_thread_count(fresh):
    threads = torch.get_num_threads()
    for n in (128, 600):                                      # 600: the packed blocks
        W, mask, values, st = pattern(512, 300, 0.1, torch.int32, seed=1)
        x, g = torch.randn(300, n), torch.randn(512, n)
        try:
            out = {}
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                out[t] = (native.spmm(st.crow, st.col, values, x, None),
                          native.spmm(st.crow_t, st.col_t, values, g, perm=st.perm),
                          native.sddmm(st.crow, st.col, g, x))
        finally:
            torch.set_num_threads(threads)
        for t in (2, 3):
            assert all(torch.equal(a, b) for a, b in zip(out[1], out[t]))
        torch.testing.assert_close(out[1][0], W @ x, rtol=1e-5, atol=1e-5)


def test_the_library_runs_on_the_openmp_runtime_torch_loaded(fresh):
    """Loading the kernels maps no OpenMP runtime besides the one torch brought (a fresh process:
    this one has the library loaded already)."""
    assert native.available(), native.status()
    code = ("import torch\nfrom fastsparse.core import native\nbefore = native._openmp_runtimes()\n"
            "assert native.available(), native.status()\nafter = native._openmp_runtimes()\n"
            "print(len(before), sorted(after - before), any('torch' in r for r in before))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "[]", "True"], done.stdout


def layer_grads(layer: SparseLinear, x: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, layer.values.grad, layer.bias.grad


def test_sparse_linear_runs_on_the_compiled_kernels_and_agrees_with_torchs(fresh):
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48)
    mask = torch.rand(48, 64) < 0.2
    layer = SparseLinear.from_dense(dense, mask)
    x = torch.randn(128, 64)
    calls = {"spmm": 0, "sddmm": 0}
    spmm, sddmm = native.spmm, native.sddmm

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped
    fresh.setattr(native, "spmm", count("spmm", spmm))
    fresh.setattr(native, "sddmm", count("sddmm", sddmm))
    compiled = layer_grads(layer, x)
    assert calls == {"spmm": 2, "sddmm": 1}                   # forward, input gradient, value gradient
    fresh.setenv(native.ENV_SWITCH, "0")
    native._reset_for_tests()
    reference = layer_grads(layer, x)
    assert calls == {"spmm": 2, "sddmm": 1}                   # torch's kernels this time
    for a, b in zip(compiled, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    W = dense.weight.detach() * mask                          # and both are the masked layer's
    torch.testing.assert_close(compiled[0], x @ W.t() + dense.bias.detach(), rtol=1e-5, atol=1e-5)


def test_switched_off_says_so(fresh):
    fresh.setenv(native.ENV_SWITCH, "0")
    assert not native.available()
    assert native.status() == "torch (MKL): turned off by FASTSPARSE_NATIVE=0"
    with pytest.raises(RuntimeError, match="not available"):
        native.spmm(torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0),
                    torch.zeros(1, 1))


def test_a_failing_compiler_falls_back_with_its_reason(fresh, tmp_path):
    fresh.setenv("CXX", shutil.which("false"))
    fresh.setenv(native.ENV_CACHE, str(tmp_path))
    assert not native.available()
    assert native.status().startswith("torch (MKL): not compiled: false failed")
    assert not list(tmp_path.iterdir())                       # no half-written library left behind


def test_a_folder_others_can_write_is_not_loaded_from(fresh, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    fresh.setenv(native.ENV_CACHE, str(shared))
    assert not native.available()
    assert "writable by other users" in native.status()


def test_an_unknown_instruction_set_is_named(fresh):
    fresh.setenv(native.ENV_ISA, "sse9")
    assert not native.available()
    assert "FASTSPARSE_NATIVE_ISA='sse9' is not one of ['avx2', 'avx512', 'portable']" in native.status()


def test_a_fresh_cache_builds_and_loads(fresh, tmp_path):
    fresh.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    assert native.available(), native.status()
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].name.startswith("native-") and built[0].suffix == ".so"
    assert (tmp_path / "cache").stat().st_mode & 0o077 == 0   # a private folder


def test_a_reused_output_buffer_gives_the_same_product_and_a_wrong_one_is_refused(fresh):
    W, mask, values, st = pattern(30, 20, 0.3, torch.int32, seed=3)
    x = torch.randn(20, 7)
    buf = torch.full((30, 7), float("nan"))                  # its content is ignored
    out = native.spmm(st.crow, st.col, values, x, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(out, native.spmm(st.crow, st.col, values, x))
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 \(30, 7\) tensor"):
        native.spmm(st.crow, st.col, values, x, out=torch.empty(7, 30))


def test_mixed_index_types_are_refused_before_any_read(fresh):
    W, mask, values, st = pattern(10, 12, 0.3, torch.int32, seed=4)
    with pytest.raises(ValueError, match="all be int32 or all int64"):
        native.spmm(st.crow_t, st.col_t, values, torch.randn(10, 3), perm=st.perm.long())
    with pytest.raises(ValueError, match="all be int32 or all int64"):
        native.sddmm(st.crow, st.col.long(), torch.randn(10, 3), torch.randn(12, 3))


def test_the_inference_layer_uses_the_compiled_kernels_from_16_rows(fresh):
    from fastsparse.deploy.modules import NATIVE_FROM_ROWS, SparseLinear as InferenceLinear
    torch.manual_seed(0)
    W = torch.randn(24, 40) * (torch.rand(24, 40) < 0.2)
    b = torch.randn(24)
    layer = InferenceLinear(W, b)
    calls = []
    spmm = native.spmm
    fresh.setattr(native, "spmm", lambda *a, **k: calls.append(1) or spmm(*a, **k))
    for rows in (1, NATIVE_FROM_ROWS - 1, NATIVE_FROM_ROWS, 100):
        x = torch.randn(rows, 40)
        torch.testing.assert_close(layer(x), x @ W.t() + b, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2                                    # the two calls of at least 16 rows
    x3 = torch.randn(4, 5, 40)                                # leading dimensions kept
    torch.testing.assert_close(layer(x3), x3 @ W.t() + b, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_with_other_index_types_and_counts_loads_as_one_type(fresh):
    """A layer saved with int64 indices and another count loads into an int32 layer with all five
    index tensors int64 (mixed types would send the kernels out of bounds), and computes right."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(20, 12)
    small = SparseLinear.from_dense(dense, torch.rand(12, 20) < 0.2)
    big_mask = torch.rand(12, 20) < 0.5
    saved = SparseLinear.from_dense(dense, big_mask, index_dtype=torch.int64).state_dict()
    assert small.crow.dtype == torch.int32 and saved["crow"].dtype == torch.int64
    small.load_state_dict(saved)
    assert {getattr(small, n).dtype for n in ("crow", "col", "crow_t", "col_t", "perm")} == {torch.int64}
    x = torch.randn(128, 20)
    torch.testing.assert_close(small(x), x @ (dense.weight * big_mask).t() + dense.bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="size mismatch"):   # another shape is still refused
        SparseLinear.from_dense(torch.nn.Linear(20, 13), torch.rand(13, 20) < 0.5).load_state_dict(saved)


def test_float64_layers_run_on_torchs_kernels_and_say_so_once(fresh, caplog):
    from fastsparse.core import sparse_linear
    fresh.setattr(sparse_linear, "_told", set())
    torch.manual_seed(0)
    dense = torch.nn.Linear(20, 12).double()
    layer = SparseLinear.from_dense(dense, torch.rand(12, 20) < 0.3)
    x = torch.randn(32, 20, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="fastsparse"):
        for _ in range(3):
            y = layer(x)
    torch.testing.assert_close(y, x @ (dense.weight * layer.mask()).t() + dense.bias)
    told = [r.getMessage() for r in caplog.records if "torch's kernels" in r.getMessage()]
    assert told == ["sparse layers with torch.float64 tensors (the compiled kernels take float32) run on torch's "
                    "kernels, 2-3x slower than the compiled ones"]


def test_the_first_load_is_waited_for_by_every_thread(fresh, tmp_path):
    """Threads that ask while the library is being built wait for it instead of running torch's
    kernels with no reason given."""
    import threading
    fresh.setenv(native.ENV_CACHE, str(tmp_path / "cache"))    # an empty cache: a real build
    results = []
    threads = [threading.Thread(target=lambda: results.append((native.available(), native.status())))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(ok and status.startswith("native (") for ok, status in results), results


def test_the_kernels_refuse_arguments_that_do_not_fit(fresh):
    W, mask, values, st = pattern(10, 12, 0.3, torch.int32, seed=5)
    with pytest.raises(ValueError, match="cannot take torch.float64"):
        native.spmm(st.crow, st.col, values, torch.randn(12, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"G must be \(10, N\) and X \(K, N\)"):
        native.sddmm(st.crow, st.col, torch.randn(10, 8), torch.randn(12, 4))
    with pytest.raises(ValueError, match="the bias must have 10 entries"):
        native.spmm(st.crow, st.col, values, torch.randn(12, 3), torch.randn(9))
    with pytest.raises(ValueError, match="values for"):
        native.spmm(st.crow, st.col, values[:-1], torch.randn(12, 3))
    assert native.unfit(torch.randn(3, 4).t()) == "a non-contiguous tensor"
    assert native.unfit(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)) == \
        "index tensors of mixed types"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_sparse_layer_after_autocast_layers_trains_in_its_own_dtype(fresh, dtype):
    """Under CPU autocast a dense Linear hands bf16/fp16 on; the sparse layer computes in float32
    (torch's CSR kernels have no half types: this was a NotImplementedError inside training)."""
    from fastsparse.deploy.modules import SparseLinear as InferenceLinear
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48)
    mask = torch.rand(10, 48) < 0.3
    head = torch.nn.Linear(48, 10)
    sparse = SparseLinear.from_dense(head, mask)
    x = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=dtype):
        hidden = dense(x)
        out = sparse(hidden)
    assert hidden.dtype == dtype and out.dtype == torch.float32
    out.sum().backward()
    assert dense.weight.grad is not None and torch.isfinite(dense.weight.grad).all()
    assert sparse.values.grad is not None and torch.isfinite(sparse.values.grad).all()
    reference = hidden.float().detach() @ (head.weight.detach() * mask).t() + head.bias.detach()
    torch.testing.assert_close(out.detach(), reference, rtol=1e-5, atol=1e-5)
    inference = InferenceLinear(head.weight.detach() * mask, head.bias.detach())
    torch.testing.assert_close(inference(hidden.detach()), reference, rtol=1e-5, atol=1e-5)
