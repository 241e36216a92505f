"""Compiled CPU kernels of sparse execution: CSR @ dense (forward and input gradient) and the
sampled product (weight gradient), measured 2-3x faster than torch's MKL kernels on this
project's machines (``benchmarks/native_kernels.py``).

The C++ source (``_native.cpp``) is compiled on first use with the machine's C++ compiler
(``$CXX``, else ``c++``/``g++``/``clang++``) into ``~/.cache/fastsparse`` (``$FASTSPARSE_CACHE``)
and loaded with :mod:`ctypes`; the library's name carries a hash of the source, the compiler and
the flags, so a changed source is rebuilt and never confused with an old build. The file is built
without ``-march`` flags and picks AVX-512F, AVX2 + FMA or portable C++ at run time.

Nothing here is required: without a compiler (or with ``FASTSPARSE_NATIVE=0``) sparse execution
runs on torch's kernels, and :func:`status` says which kernels run and why. The library is only
loaded from a folder owned by the user and writable by no one else.

Threads: ``torch.get_num_threads()`` OpenMP threads, each on a range of rows holding about equal
nonzero counts. The library links libgomp, which torch's Linux wheels have already loaded, so
the kernels run on torch's own thread pool (threads of another pool compete with torch's, which
spin for a while after each parallel operation: measured 1.7x slower steps); a library that
brings an OpenMP runtime of its own is not used (:func:`status` says so). Each output element is summed by one
thread in a fixed order, so results do not depend on the number of threads.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = ["available", "status", "spmm", "sddmm", "usable", "unfit", "turned_off", "ISA_NAMES"]

ENV_SWITCH = "FASTSPARSE_NATIVE"        # "0": use torch's kernels
ENV_CACHE = "FASTSPARSE_CACHE"
ENV_ISA = "FASTSPARSE_NATIVE_ISA"       # "avx512" | "avx2" | "portable": at most this instruction set
ISA_NAMES = {2: "avx512", 1: "avx2", 0: "portable"}
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fopenmp"]
_SOURCE = Path(__file__).with_name("_native.cpp")

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_isa = 0
_reason: Optional[str] = None            # why the kernels are not used (None: not loaded yet / in use)
_done = False                            # the first load has finished (or failed)
_off = 0                                 # > 0 inside turned_off()


def _compiler() -> Optional[list[str]]:
    """The compiler's command: ``$CXX`` (which may hold arguments, e.g. ``ccache g++``), else the
    first of c++, g++, clang++ found."""
    given = shlex.split(os.environ.get("CXX", ""))
    if given:
        found = shutil.which(given[0])
        if found is None:
            raise RuntimeError(f"CXX={os.environ['CXX']!r}: {given[0]} not found")
        return [found, *given[1:]]
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [shutil.which(name)]
    return None


def _private_dir(path: Path) -> Optional[str]:
    """None when ``path`` is a folder owned by this user that nobody else can write, else why not."""
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{path} is owned by another user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by other users"
    return None


def _build() -> Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    version = subprocess.run([*cxx, "--version"], capture_output=True, timeout=60).stdout.decode(errors="replace")
    key = hashlib.sha256(_SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode()
                         + platform.machine().encode()).hexdigest()[:16]
    folder = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "fastsparse").expanduser()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    problem = _private_dir(folder)
    if problem:
        raise RuntimeError(f"will not load compiled code from a shared folder: {problem}")
    target = folder / f"native-{key}.so"
    if not target.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            done = subprocess.run([*cxx, *FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, timeout=300)
            if done.returncode != 0:
                text = (done.stderr or done.stdout).decode(errors="replace")
                lines = text.strip().splitlines() or ["no message"]
                first = next((line for line in lines if "error" in line), lines[-1])
                raise RuntimeError(f"{Path(cxx[0]).name} failed: {first.strip()[:300]}")
            os.replace(tmp, target)   # atomic: a concurrent process sees the old state or the whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    names = {"libgomp", "libomp", "libiomp5"}
    return {line.split()[-1] for line in maps.splitlines()
            if line.split() and any(Path(line.split()[-1]).name.startswith(n) for n in names)}


def _load() -> None:
    """Build and load the library once per process; every caller waits for the first one."""
    global _lib, _isa, _reason, _done
    with _lock:
        if _done:
            return
        try:
            _lib, _isa, _reason = _open()
        except Exception as err:   # whatever went wrong, the kernels are not used and status() says why
            _lib, _reason = None, f"not compiled: {type(err).__name__}: {err}"
        finally:
            _done = True


def _open() -> tuple[Optional[ctypes.CDLL], int, Optional[str]]:
    """(library, instruction set, None), or (None, 0, why not)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, 0, f"turned off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    cap = os.environ.get(ENV_ISA, "").strip().lower()
    by_name = {v: k for k, v in ISA_NAMES.items()}
    if cap and cap not in by_name:
        return None, 0, f"{ENV_ISA}={os.environ[ENV_ISA]!r} is not one of {sorted(by_name)}"
    before = _openmp_runtimes()
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        return None, 0, f"not compiled: {err}"
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("fs_spmm_i32", "fs_spmm_i64"):
        getattr(lib, name).argtypes = [ptr] * 7 + [i64, i64, i64, c_int, c_int]
        getattr(lib, name).restype = None
    for name in ("fs_sddmm_i32", "fs_sddmm_i64"):
        getattr(lib, name).argtypes = [ptr] * 5 + [i64, i64, i64, c_int, c_int]
        getattr(lib, name).restype = None
    added = _openmp_runtimes() - before
    if added and before:
        return None, 0, f"the compiled library brought another OpenMP runtime ({', '.join(sorted(added))})"
    lib.fs_isa.restype = c_int
    isa = lib.fs_isa()
    return lib, min(isa, by_name[cap]) if cap else isa, None


def available() -> bool:
    """Whether the compiled kernels run here (compiles them on the first call)."""
    if not _done:
        _load()
    return _lib is not None


def status() -> str:
    """Which kernels sparse execution uses on CPU, and why: ``native (avx512)`` or
    ``torch (MKL): <reason>`` (torch builds without MKL: ``torch (its CSR kernels): <reason>``)."""
    if available():
        return f"native ({ISA_NAMES[_isa]})"
    return f"torch ({'MKL' if torch.backends.mkl.is_available() else 'its CSR kernels'}): {_reason}"


@contextmanager
def turned_off() -> Iterator[None]:
    """Within this block sparse execution runs on torch's kernels (to compare the two)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def unfit(*tensors: Optional[Tensor]) -> Optional[str]:
    """Why these tensors cannot go to the compiled kernels (None: they can). The kernels take
    contiguous CPU tensors: float32 data and indices all int32 or all int64."""
    indices = set()
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu":
            return f"a {t.device.type} tensor"
        if t.dtype in (torch.int32, torch.int64):
            indices.add(t.dtype)
        elif t.dtype != torch.float32:
            return f"{t.dtype} tensors (the compiled kernels take float32)"
        if not t.is_contiguous():
            return "a non-contiguous tensor"
    if len(indices) > 1:
        return "index tensors of mixed types"
    return None


def usable(*tensors: Optional[Tensor]) -> bool:
    """Whether the compiled kernels run here and take these tensors (see :func:`unfit`)."""
    return not _off and unfit(*tensors) is None and available()


def _require() -> None:
    if not available():
        raise RuntimeError(f"the compiled kernels are not available: {status()}")


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _fit(*tensors: Optional[Tensor]) -> None:
    why = unfit(*tensors)
    if why is not None:
        raise ValueError(f"the compiled kernels cannot take {why}")


def _same_index_dtype(*indices: Optional[Tensor]) -> None:
    """The kernels read every index tensor as crow's type: a mixed set would be read out of bounds."""
    dtypes = {t.dtype for t in indices if t is not None}
    if len(dtypes) != 1 or not dtypes <= {torch.int32, torch.int64}:
        raise ValueError(f"the index tensors must all be int32 or all int64, not {sorted(map(str, dtypes))}")


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def spmm(crow: Tensor, col: Tensor, values: Tensor, B: Tensor, bias: Optional[Tensor] = None,
         perm: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """``bias 1^T + A @ B`` for the CSR matrix ``A`` = (crow, col, values[perm] or values) of
    ``crow.numel() - 1`` rows and a contiguous (K, N) ``B``: a contiguous (rows, N) tensor, new or
    ``out`` (a reused buffer spares the first touch of its pages; its content is ignored). The
    caller checks :func:`usable` first."""
    _require()
    _same_index_dtype(crow, col, perm)
    rows = crow.numel() - 1
    _check(B.dim() == 2, f"B must be 2-D, not {tuple(B.shape)}")
    _check(crow.numel() > 0 and col.numel() == int(crow[-1]), "crow[-1] must be col's length")
    _check(values.numel() == col.numel(), f"{values.numel()} values for {col.numel()} indices")
    _check(perm is None or perm.numel() == col.numel(), "perm must have one entry per index")
    _check(bias is None or bias.numel() == rows, f"the bias must have {rows} entries")
    _fit(values, B, bias, perm, crow, col)
    n = B.shape[1]
    if out is None:
        out = torch.empty(rows, n, dtype=torch.float32)
    elif out.shape != (rows, n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 ({rows}, {n}) tensor, not {out.dtype} {tuple(out.shape)}")
    if rows == 0 or n == 0:
        return out
    fn = _lib.fs_spmm_i32 if crow.dtype == torch.int32 else _lib.fs_spmm_i64
    fn(_ptr(crow), _ptr(col), _ptr(values), _ptr(perm), _ptr(B), _ptr(bias), _ptr(out), rows, B.shape[0], n,
       torch.get_num_threads(), _isa)
    return out


def sddmm(crow: Tensor, col: Tensor, G: Tensor, X: Tensor) -> Tensor:
    """``(G @ X^T)`` at the positions of the CSR pattern (crow, col), in its order: for a
    contiguous (rows, N) ``G`` and (K, N) ``X``, a new (nnz,) tensor. The caller checks
    :func:`usable` first."""
    _require()
    _same_index_dtype(crow, col)
    rows = crow.numel() - 1
    _check(G.dim() == 2 and X.dim() == 2 and G.shape[0] == rows and X.shape[1] == G.shape[1],
           f"G must be ({rows}, N) and X (K, N), not {tuple(G.shape)} and {tuple(X.shape)}")
    _check(crow.numel() > 0 and col.numel() == int(crow[-1]), "crow[-1] must be col's length")
    _fit(G, X, crow, col)
    nnz, n = col.numel(), G.shape[1]
    if nnz == 0 or n == 0:
        return torch.zeros(nnz, dtype=torch.float32)
    out = torch.empty(nnz, dtype=torch.float32)
    fn = _lib.fs_sddmm_i32 if crow.dtype == torch.int32 else _lib.fs_sddmm_i64
    fn(_ptr(crow), _ptr(col), _ptr(G), _ptr(X), _ptr(out), crow.numel() - 1, X.shape[0], n,
       torch.get_num_threads(), _isa)
    return out


def _reset_for_tests() -> None:
    """Forget the loaded library so that the next call reads the environment again."""
    global _lib, _isa, _reason, _done
    with _lock:
        _lib, _isa, _reason, _done = None, 0, None, False
