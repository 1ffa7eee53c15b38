"""The CPU row kernel: a block of logits becomes probabilities and the metrics' per-row sums in one pass.

Why: on CPU a tapped layer's probabilities come block by block (:mod:`probekit.attention`), and
the row-wise metrics then read each block again: a ``torch.mv`` against a distance matrix for
MAD, a dot product with the logits and a sum for entropy, a gather for ``lse``. At 1370 tokens
those reads cost as much as the softmax itself. This kernel (``_cpu_rows.c``) makes the softmax
and every sum in the passes over each row that the softmax needs anyway, with the row in L1: the
maximum, then ``exp`` with the running sums (a query's distances to every key computed from token
indices once and shared by its heads; no distance matrix), then the normalization, which is left
out where only ``P @ V`` reads the rows (its ``[R, dv]`` product is scaled instead). The sums are the fused GPU kernel's
:class:`~probekit.metric.terms.RowTerms` for the rows of one block, so metrics read them through the
same :meth:`~probekit.Metric.row_values` (``block.terms``) (:mod:`probekit.engine.kernels.block_terms`).

It is C, compiled at first use with the system's C compiler (``cc``, or ``$CC``) for this CPU
(``-march=native``) into ``~/.cache/probekit`` (``$PROBEKIT_CACHE_DIR``), and loaded with
ctypes. Rows are split across torch's thread count with OpenMP, linked against the
``libgomp.so.1`` torch has already loaded (torch's Linux wheels): the same thread pool as torch's
matmuls, whose threads would otherwise spin against a second pool on the same cores (with
Python threads the kernel's share of a layer was slower: benchmarks/RESULTS.md, section "Smaller
engine choices"). Where ``-fopenmp`` does not
build, Python threads split the rows (a ctypes call releases the GIL). Where no compiler works,
the engine takes the PyTorch path (same numbers, slower); :func:`build_error` says why, and
``PROBEKIT_CPU_KERNEL=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

from probekit.attention import Workspace
from probekit.metric.terms import RowTerms
from probekit.tokens import TokenLayout

__all__ = ["library", "RowKernel", "available", "build_error", "softmax_terms", "attention", "AttentionCall",
           "TERMS"]

#: The terms this kernel makes (a subset of :data:`probekit.metric.terms.TERMS`: no histogram).
TERMS = frozenset({"lse", "patch_mass", "patch_logit", "dist", "prefix"})

_SOURCE = Path(__file__).with_name("_cpu_rows.c")
_FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC")
_ABI = 8
_error: str | None = None


def _private(path: Path) -> bool:
    """Whether only this user can have written ``path``: owned by us, not group- or world-writable.

    Why: the library is loaded with ``ctypes.CDLL`` (its code runs in this process) and its file
    name is computable by anyone, so a cache folder or file that another user can write is never
    loaded from.
    """
    if not hasattr(os, "getuid"):  # Windows: caches live in the user's own profile
        return True
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _cache_dir() -> Path:
    """``$PROBEKIT_CACHE_DIR`` or ``~/.cache/probekit``; a per-user temporary folder where that is
    read-only; a fresh private folder where neither is this user's alone (see :func:`_private`)."""
    root = os.environ.get("PROBEKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "probekit")
    user = getattr(os, "getuid", lambda: "user")()
    for path in (Path(root) / "cpu_kernel", Path(tempfile.gettempdir()) / f"probekit-{user}" / "cpu_kernel"):
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if os.access(path, os.W_OK) and _private(path):
                return path
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix="probekit-cpu-kernel-"))  # 0700: this process builds its own


def _compile(src: bytes, cc: str, arch: tuple[str, ...], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        c = Path(tmp) / "rows.c"
        c.write_bytes(src)
        so = Path(tmp) / "rows.so"
        subprocess.run([cc, *_FLAGS, *arch, str(c), "-o", str(so), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.chmod(so, 0o755)  # writable by this user alone, whatever the umask (see _private)
        os.replace(so, dest)  # atomic: another process may build the same file at the same time


class RowKernel(ctypes.CDLL):
    """The compiled library; ``openmp``: whether it was built with OpenMP (else rows run on Python threads)."""

    openmp: bool = False


@functools.lru_cache(maxsize=1)
def library() -> RowKernel | None:
    """The compiled kernel, built once per source, compiler and CPU; None where it cannot be built
    (see :func:`build_error`) or is turned off (``PROBEKIT_CPU_KERNEL=0``)."""
    global _error
    if os.environ.get("PROBEKIT_CPU_KERNEL", "1") == "0":
        _error = "turned off by PROBEKIT_CPU_KERNEL=0"
        return None
    src = _SOURCE.read_bytes()
    cc = os.environ.get("CC", "cc")
    errors = []
    cache = _cache_dir()
    # a compiler without OpenMP: Python threads; without -march=native: portable code
    for arch in (("-march=native", "-fopenmp"), ("-march=native", "-fopenmp-simd"), ("-fopenmp-simd",)):
        key = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(_FLAGS + arch).encode(), _cpu_id()])).hexdigest()
        dest = cache / f"rows-{key[:20]}.so"
        try:
            if not dest.exists() or not _private(dest):  # (a file others could write is built again)
                _compile(src, cc, arch, dest)
            lib = RowKernel(str(dest))
            if lib.pk_abi_version() != _ABI:
                raise OSError(f"{dest} is from another probekit version")
        except FileNotFoundError:
            errors = [f"no C compiler {cc!r} found"]
            break
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            errors.append(f"{cc} {' '.join(arch)}: {e} {detail.decode(errors='replace')[-300:]}".strip())
            continue
        _declare(lib)
        return lib
    _error = "could not build the CPU row kernel (" + "; ".join(errors) + ")"
    warnings.warn(f"probekit: {_error}; using the slower PyTorch path. Install a C compiler (e.g. apt-get "
                  "install gcc) or set PROBEKIT_CPU_KERNEL=0 to silence this.", RuntimeWarning, stacklevel=2)
    return None


def build_error() -> str | None:
    """Why :func:`library` returned None (None when it built)."""
    library()
    return _error


def _cpu_id() -> bytes:
    """What ``-march=native`` depends on: the machine and its CPU flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}".encode()


def _declare(lib: RowKernel) -> None:
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.pk_softmax_terms.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, i64, f32, f32,
                                     ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.pk_softmax_terms.restype = None
    lib.pk_attention.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, f32, i64, i64, i64, i64, ptr, ptr, i64, f32, f32,
                                 ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.pk_attention.restype = None
    lib.pk_attention_floats.argtypes = [i64, i64, i64, i64]
    lib.pk_attention_floats.restype = i64
    lib.openmp = bool(lib.pk_openmp())


def available(t: torch.Tensor) -> bool:
    """Whether a block ``t`` can go through the kernel: contiguous float32 on CPU, and the kernel built."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and library() is not None


_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != n:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (n, ThreadPoolExecutor(n, thread_name_prefix="probekit-rows"))
        return _pool[1]


def _on_threads(part: Callable[[int, int, int], None], n: int, threads: int) -> None:
    """``part(a, e, i)`` for ``threads`` ranges ``[a, e)`` of ``n`` items, the ``i``-th range on the ``i``-th of
    as many Python threads (the kernels' fallback where they built without OpenMP; a ctypes call
    releases the GIL)."""
    step = -(-n // threads)
    futures = [_executor(threads).submit(part, a, min(a + step, n), a // step) for a in range(0, n, step)]
    for f in futures:
        f.result()


@functools.lru_cache(maxsize=8)
def _key_positions(n: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid row and column of each of ``n`` patch keys (float32; ``i // width``, ``i % width``)."""
    i = torch.arange(n)
    return (i // width).float(), (i % width).float()


def softmax_terms(logits: torch.Tensor, probs: torch.Tensor, batch: slice, rows: slice, layout: TokenLayout,
                  into: RowTerms, inv: torch.Tensor | None = None) -> None:
    """Write ``softmax(logits)`` to ``probs`` and the block's per-row terms into a layer's terms.

    Args:
        logits, probs: contiguous float32 ``[b, H, R, T]`` on CPU (:func:`available`): the query
            tokens ``rows`` of the images ``batch`` (a step-1 slice); ``probs`` may be ``logits``
            (in place).
        layout: the layer's token layout (prefix tokens first, then the grid row by row).
        into: the layer's terms, contiguous float32 ``[B, H, T]`` (``prefix``: ``[B, H, T, n0]``);
            the terms that are None there are not made (``lse`` and ``patch_mass`` always are).
        inv: a contiguous float32 ``[b, H, R]``: leave ``probs`` unnormalized (``exp(z - max)``) and
            write each row's ``1 / sum`` here, for a caller that only multiplies ``probs`` by V.
    """
    lib = library()
    assert lib is not None, "softmax_terms is for blocks that available() accepts"
    nb, h, r, t = logits.shape
    n0 = layout.num_prefix
    if t != layout.num_tokens:
        raise ValueError(f"a block of {t} keys does not match the layout's {layout.num_tokens} tokens")
    outs = _term_pointers(into, n0, first_row=(batch.start or 0) * h * t + rows.start)  # the block's in [B, H, T]
    z0, p0 = logits.data_ptr(), probs.data_ptr()
    i0 = None if inv is None else inv.data_ptr()
    positions = _layout_args(layout)  # held until the kernel has run: its key positions stay alive
    _, ky, kx, gw, py, px = positions.args

    def part(a: int, e: int, threads: int = 1) -> None:  # the (image, row) pairs [a, e), all heads
        lib.pk_softmax_terms(z0, p0, h, r, t, a, e, rows.start, t, n0, ky, kx, gw, py, px, *outs, i0, threads)

    n = nb * r
    threads = max(1, min(torch.get_num_threads(), n * h // 16))  # a few rows: not worth a thread hand-off
    if threads == 1 or lib.openmp:
        part(0, n, threads)
        return
    _on_threads(lambda a, e, i: part(a, e), n, threads)


_I64x12, _I64x5 = ctypes.c_int64 * 12, ctypes.c_int64 * 5  # array types made once (each new one is a class)


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    st = x.stride()
    if x.dtype != torch.float32 or x.device.type != "cpu" or len(st) != 4 or st[3] != 1:
        raise ValueError("attention() takes float32 CPU [B, H, T, d] tensors whose last dimension is contiguous")
    return st[:3]


def _term_pointers(into: RowTerms, n0: int, first_row: int = 0,
                   shape: tuple[int, int, int] | None = None) -> list[int | None]:
    """The kernels' pointers to a layer's terms (``into``, ``[B, H, T]``; ``prefix`` ``[B, H, T, n0]``) at the
    row ``first_row`` of ``[B, H, T]``, in the C functions' order; None for the terms not made. ``shape``:
    the ``[B, H, T]`` they must have."""
    out: list[int | None] = []
    for x, width in ((into.lse, 1), (into.patch_mass, 1), (into.patch_logit, 1), (into.dist_px, 1),
                     (into.dist_grid, 1), (into.prefix if n0 else None, n0)):
        if x is None:
            out.append(None)
            continue
        if not (x.is_contiguous() and x.dtype == torch.float32 and x.device.type == "cpu") or (
                shape is not None and tuple(x.shape[:3]) != shape):
            raise ValueError("the layer's terms must be contiguous float32 [B, H, T] CPU tensors "
                             "(block_terms.layer_terms)")
        out.append(x.data_ptr() + 4 * first_row * width)
    return out


@functools.lru_cache(maxsize=16)
def _scratch_floats(lib: RowKernel, tokens: int, d: int, dv: int, num_prefix: int) -> int:
    return int(lib.pk_attention_floats(tokens, d, dv, num_prefix))


class _LayoutArgs(NamedTuple):
    """The kernels' layout arguments, with the tensors two of them point into."""

    args: tuple  # prefix count, key rows and key columns (pointers), grid width, patch height and width
    positions: tuple[torch.Tensor, torch.Tensor]  # alive while this is held: the pointers stay valid


@functools.lru_cache(maxsize=16)
def _layout_args(layout: TokenLayout) -> _LayoutArgs:
    """The kernels' layout arguments for ``layout``. Hold the result while its pointers are in use: the
    key positions are freed with it (not with :func:`_key_positions`' smaller cache, which may drop them)."""
    n0 = layout.num_prefix
    ky, kx = _key_positions(layout.num_tokens - n0, layout.grid[1])
    return _LayoutArgs((n0, ky.data_ptr(), kx.data_ptr(), layout.grid[1], float(layout.patch_size[0]),
                        float(layout.patch_size[1])), (ky, kx))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
              layout: TokenLayout, into: RowTerms, workspace: Workspace | None = None) -> None:
    """One attention pass without a ``[T, T]`` buffer: ``out = softmax(q kᵀ · scale) v`` and every row's terms.

    Args:
        q, k: float32 ``[B, H, T, D]`` on CPU, strided (the views a tap hands over, read in place)
            with the last dimension contiguous; ``v``: ``[B, H, T, DV]`` the same way.
        out: where the output goes, ``[B, H, T, DV]`` with the last dimension contiguous (the engine
            passes a transposed view of a ``[B, T, H, DV]`` tensor).
        layout: the layer's token layout (prefix tokens first, then the grid row by row).
        into: the layer's terms (:func:`probekit.engine.kernels.block_terms.layer_terms`), as in
            :func:`softmax_terms`.
        workspace: where the threads' scratch comes from (kept across layers and calls; default: a new one).

    Each query row's logits, probabilities and sums stay in the L1 cache from its dot products to
    ``P V`` (``_cpu_rows.c``, ``pk_attention``): one call per layer, one parallel region.
    """
    AttentionCall(q, k, v, out, layout, into, workspace)(q, k, v, out, scale)


class AttentionCall:
    """:func:`attention` with its arguments checked and laid out once, for every layer of the same shape.

    Made from a layer's tensors (their shapes and strides), its layout and its terms; a call then
    takes any q, k, v and out with those shapes and strides (:meth:`matches`) and passes their data
    pointers only. Why: the engine calls the kernel once per layer, and checking and converting two
    dozen arguments each time was a visible share of a small model's layer (issue 25).
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, layout: TokenLayout,
                 into: RowTerms, workspace: Workspace | None = None):
        lib = library()
        assert lib is not None, "attention() is for layers that the kernel serves (cpu_pass.applies)"
        b, h, t, d = q.shape
        n0 = layout.num_prefix
        if t != layout.num_tokens:
            raise ValueError(f"{t} tokens do not match the layout's {layout.num_tokens}")
        if k.shape != (b, h, t, d) or v.shape[:3] != (b, h, t) or out.shape != v.shape:
            raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} and out {tuple(out.shape)} "
                             "do not make one layer's attention")
        self.strides = tuple(x.stride() for x in (q, k, v, out))
        self.shapes = (q.shape, k.shape, v.shape, out.shape)
        c_strides = _I64x12(*_strides(q), *_strides(k), *_strides(v), *_strides(out))
        outs = _term_pointers(into, n0, shape=(b, h, t))
        self._into = into  # the terms' buffers stay alive while their pointers are held
        rc = 32  # query rows per work item: enough items for every thread at batch 1 (6 heads: 42 at 197 tokens)
        self.items = b * h * -(-t // rc)
        self.threads = max(1, min(torch.get_num_threads(), self.items))
        per = _scratch_floats(lib, t, d, v.shape[3], n0)
        self._scratch = (workspace or Workspace()).get("attention_scratch", (self.threads * per,), q.device)
        self._per = per
        self._lib = lib
        self._fixed = (_I64x5(b, h, t, d, v.shape[3]), c_strides)
        self._positions = _layout_args(layout)  # the key positions its pointers point into stay alive with it
        self._rest = (*self._positions.args, *outs)
        self._rc = rc

    def matches(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether q, k and v have the shapes and strides this call was made for (and the thread count holds)."""
        return (q.stride() == self.strides[0] and k.stride() == self.strides[1] and v.stride() == self.strides[2]
                and q.shape == self.shapes[0] and k.shape == self.shapes[1] and v.shape == self.shapes[2]
                and q.dtype == k.dtype == v.dtype == torch.float32 and q.is_cpu and k.is_cpu and v.is_cpu
                and max(1, min(torch.get_num_threads(), self.items)) == self.threads)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None,
                 scale: float) -> None:
        """The pass on these tensors (shapes and strides as made for: :meth:`matches`; ``out`` too). ``out``
        None: the terms only (no ``P V``, v not read), for a layer whose output nothing will use."""
        if out is not None and (out.stride() != self.strides[3] or out.shape != self.shapes[3]):
            raise ValueError("out has another shape or layout than this call was made for")
        lib, scratch, items, threads = self._lib, self._scratch.data_ptr(), self.items, self.threads
        args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), None if out is None else out.data_ptr(), *self._fixed,
                scale, self._rc)
        if threads == 1 or lib.openmp:
            lib.pk_attention(*args, 0, items, *self._rest, scratch, threads)
            return
        # each thread in its own scratch, as each OpenMP thread is
        _on_threads(lambda a, e, i: lib.pk_attention(*args, a, e, *self._rest, scratch + 4 * self._per * i, 1),
                    items, threads)
