"""Calibration statistics collected on the device, without a host sync per quantizer.

Why: pytorch-quantization's calibrators ask the host a question on every call. Its
``HistogramCalibrator.collect`` evaluates ``torch.min(x) < 0``, ``x_max > edges[-1]`` and
hands ``torch.histc`` tensor bounds (each one a ``.item()``), and ``MaxCalibrator.collect``
evaluates ``torch.min(x) < 0`` too. On a GPU each question drains the launch queue. For
BEVFusion-R50 that is about 400 stalls per calibration batch, and weight quantizers redo
the same per-channel max on every batch although the weights never change.

What stays the same: the histogram. It is pytorch-quantization's ``torch_hist``
histogram of ``|x|``, with the same bins and the same counts:

* the bin width ``w`` is the first tensor's max divided by ``num_bins`` (2048);
* a value goes to bin ``floor(|x| / w)``, and a value that would land on the current top
  bin count ``nb`` goes to bin ``nb - 1`` (``histc`` puts its upper edge in the last bin);
* ``nb`` grows to ``ceil(max / w)`` when a larger max arrives, and earlier counts keep their
  bin indices (the library's ``hist[:old] += old_hist``).

While the range has not grown this is exactly the library's arithmetic: it computes
``(|x| * 2048) / max0``, and ``max0 = 2048 * w`` exactly, so the quotient is the same float.
After growth the library bins with ``(|x| * nb) / edges[-1]``, where ``edges[-1]`` is
``arange``'s last edge, about ``nb * w``. We keep dividing by ``w``. A value can then land
one bin away from the library's bin in three cases: when the two quotients round to the two
sides of a bin edge; when ``arange`` made one edge too many, so the library's top edge is
``(nb + 1) * w`` and its bins are stretched; and when the grown top edge rounds below the
new max, where the library drops that value and we count it in the last bin. The tests
check the counts against the library's within one bin, and the amax.

How, with no per-call sync:

* The bin width and ``nb`` are device scalars, and the counts live in a fixed-size buffer
  of ``C`` bins on the device (its capacity).
* On CUDA, one launch of ``count_bins.cu`` (compiled at first use with NVRTC, which ships
  with CUDA builds of torch) does a call. It reads ``x`` once and bins ``floor(|x| / w)``
  as IEEE division gives it, as torch divides: it multiplies by ``1 / w`` and divides only
  the rare values whose product lies too close to a bin edge to be sure (the kernel's
  comment has the bound). Each block counts the lowest 4096 bins in shared memory (two
  copies, so fewer warps collide), where nearly all of an activation's mass lies; each thread
  counts its bin-0 values (a ReLU output's zeros) in a register, and values further out take
  one global atomic each. The kernel also keeps a running max of ``|x| / w`` and a
  non-finite flag, and its last block sets ``nb = max(nb, ceil(max))`` and moves a value
  lying exactly on the new top edge to bin ``nb - 1``. On an H200, counting one R50 batch
  (135 tensors, 1.22 billion values) takes 2.8 ms this way (5.0 ms dividing every value),
  against 78 ms in ``torch.histc`` and 59 ms in Triton's ``tl.histogram``
  (``bench/histogram_kernels.py``). A histogram's first call launches ``first_range``
  before that: it sets the width and ``nb`` from the tensor's max, with the torch ops'
  arithmetic, and zeroes the buffer, in one launch where four torch ops and a fill were
  (a first batch starts 105 histograms). The kernels are checked on known cases at first
  use; a failure logs a warning and selects the torch ops.
* Elsewhere (CPU, or ``BEVFUSION_PTQ_HISTOGRAM=torch``) the same bins come from torch ops:
  ``abs``, one division, ``amax``, a clamp to ``nb - 0.5`` and ``histc(t, C, 0, C)``. ``C``
  is a power of two, so ``histc``'s own arithmetic leaves ``floor(t)`` unchanged. ``histc``
  keeps its bins in shared memory up to 12285 float bins (48 KiB), so a buffer holds
  :data:`NEAR_BINS` = 8192 bins, and a larger buffer adds a second ``histc`` over the far
  bins, where few values fall. Both paths give identical counts (a GPU test, and the
  benchmark's check on growing ranges); counts past 2**24 in one bin round in float32, as
  the library's own do.
* A :class:`CollectSession` reads the scalars of every calibrator once per batch, in one
  small copy. That one read finds non-finite activations: a NaN or inf makes ``nb``
  non-finite for good, so the read names the quantizer (the first in call order) and the
  batch, before the caller can save a poisoned state. It also grows buffers that are half
  full.
* Some ranges grow far within a batch: a residual add quantizes a small conv output and
  then the large identity with one quantizer (on bevfusion-r50 a lidar add grows 42-fold).
  So a calibrator called again within its first batch enlarges its buffer to hold
  :data:`FIRST_BATCH_GROWTH`-fold growth, without asking the device. After that a buffer
  grows whenever the per-batch read finds it half full. If a batch still grows a range past
  its buffer, the session restores those calibrators from the device copy taken before the
  batch, enlarges their buffers and runs the batch again for them alone. The result is exact.
* A weight quantizer sees the same parameter on every batch. Its max calibrator skips a
  tensor that it has already seen: the same object, the same version counter and the same
  storage. Max is idempotent, so the amax is unchanged.

Outside a session these calibrators still work: they size their buffer with a sync on
every call, and nothing checks for non-finite values. The statistics stay
readable and writable through pytorch-quantization's own attributes (``_calib_hist``,
``_calib_bin_edges``, ``_num_bins``, ``_calib_amax``), so :mod:`.calib_state` and
:mod:`.compat` see an ordinary calibrator. Reading those attributes costs one sync.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pytorch_quantization import calib
from pytorch_quantization import utils as quant_utils
from pytorch_quantization.nn import TensorQuantizer
from torch import Tensor

from bevfusion_ptq.errors import CalibrationError

log = logging.getLogger(__name__)

#: Bins of one ``histc`` call that stay in shared memory on CUDA: the kernel needs
#: ``bins * 4 + 8`` bytes under the 48 KiB per-block default. A power of two, so that
#: ``histc(t, NEAR_BINS, 0, NEAR_BINS)`` bins at ``floor(t)`` exactly.
NEAR_BINS = 8192

#: Largest tensor turned into a float32 temporary in one piece. A larger contiguous tensor
#: is binned in chunks, so that calibration adds at most 64 MiB to the forward's peak memory.
CHUNK_ELEMENTS = 1 << 24

#: pytorch-quantization's bin count for activation histograms (TensorQuantizer's default).
DEFAULT_BINS = 2048

#: Growth of a histogram's range that its buffer holds, within a collect session, from its
#: second call in its first batch on, without a sync. On bevfusion-r50 (the benchmark's random
#: weights and batches) the largest is 42-fold, a lidar residual add; 24 quantizers are called
#: more than once per batch. 1 MiB per such histogram; one that grows further costs that batch
#: again (see CollectSession).
FIRST_BATCH_GROWTH = 64

#: Device scalars per calibrator: [bin width, nb, running max of |x| / width, non-finite seen,
#: the CUDA kernel's count of finished blocks (zero between launches)].
STATE_WIDTH = 5


# --------------------------------------------------------------- CUDA kernels (NVRTC)
#: ``torch`` forces the torch-op path on CUDA too (A/B measurements, or a kernel problem).
BACKEND_ENV = "BEVFUSION_PTQ_HISTOGRAM"

#: Threads per block of the counting kernel, blocks per multiprocessor at most, and values
#: per block at least (a small tensor gets few blocks: each block adds its shared-memory
#: histogram to the buffer once, with one atomic per non-empty bin).
COUNT_THREADS = 1024
COUNT_BLOCKS_PER_SM = 1
COUNT_MIN_VALUES_PER_BLOCK = 1 << 16
#: Bins counted in shared memory (the rest take a global atomic per value), and copies of
#: that histogram per block (see count_bins.cu). 32 KiB.
LOCAL_BINS = 4096
LOCAL_COPIES = 2
#: Largest piece handed to one launch: the kernel indexes values with a 32-bit int.
LAUNCH_ELEMENTS = 1 << 30
#: Divide every value by the bin width, as the first version of count_bins.cu did, instead
#: of multiplying by its reciprocal with an exact division near bin edges (same bins; the
#: benchmark compares the two).
DIVIDE_EVERY_VALUE = False
#: 16-byte loads a thread issues before counting them (more reads in flight).
LOADS_PER_STEP = 4


class _CountKernel:
    """count_bins.cu compiled for one GPU, launched through the driver API.

    Why not the callable that ``torch.cuda._compile_kernel`` returns: it rebuilds its
    argument block from Python objects on every launch. A calibration batch makes 135
    launches between the forward's own, and the host's time is what bounds it once the
    kernel is fast. Here the block for a (state, buffer, capacity) triple is built once and
    only the tensor's address and length change.
    """

    def __init__(self, device: torch.device) -> None:
        from importlib import resources

        source = resources.files(__package__).joinpath("count_bins.cu").read_text()
        self.index = device.index
        with torch.cuda.device(device):
            options = [f"-DLOCAL_BINS={LOCAL_BINS}", f"-DLOCAL_COPIES={LOCAL_COPIES}",
                       f"-DLOADS_PER_STEP={LOADS_PER_STEP}"]
            if DIVIDE_EVERY_VALUE:
                options.append("-DDIVIDE_EVERY_VALUE")
            compiled = torch.cuda._compile_kernel(source, "count_bins", nvcc_options=options)
            ranged = torch.cuda._compile_kernel(source, "first_range", nvcc_options=options)
            self.multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
        self._func = ctypes.c_void_p(compiled.func.value)
        self._first_func = ctypes.c_void_p(ranged.func.value)
        self._keep = (compiled, ranged)  # they own the loaded modules
        self._driver = ctypes.CDLL("libcuda.so.1")
        self._blocks: dict[tuple[int, int, int], tuple[Any, ...]] = {}

    def _block(self, state: Tensor, grid: Tensor, capacity: int) -> tuple[Any, ...]:
        key = (state.data_ptr(), grid.data_ptr(), capacity)
        block = self._blocks.get(key)
        if block is None:
            if len(self._blocks) > 4096:
                self._blocks.clear()
            values = (ctypes.c_void_p(), ctypes.c_int(), ctypes.c_void_p(key[0]), ctypes.c_void_p(key[1]),
                      ctypes.c_int(capacity), ctypes.c_int())
            pointers = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
            block = self._blocks[key] = (values, pointers)
        return block

    def _grid_size(self, values: int) -> int:
        return max(1, min(-(-values // COUNT_MIN_VALUES_PER_BLOCK), self.multiprocessors * COUNT_BLOCKS_PER_SM))

    def _launch(self, func: ctypes.c_void_p, values: int, pointers: Any, name: str) -> None:
        """One launch of ``func`` over ``values`` values on the current stream of this GPU."""
        if torch.cuda.current_device() != self.index:
            with torch.cuda.device(self.index):  # the kernel belongs to its GPU's context
                return self._launch(func, values, pointers, name)
        blocks = self._grid_size(values)
        # The raw handle of the current stream: no Python Stream object per launch.
        stream = ctypes.c_void_p(torch._C._cuda_getCurrentRawStream(self.index))
        status = self._driver.cuLaunchKernel(func, blocks, 1, 1, COUNT_THREADS, 1, 1, 0, stream, pointers, None)
        if status != 0:
            raise RuntimeError(f"cuLaunchKernel({name}) failed with CUDA error {status}")

    def first_range(self, flat: Tensor, state: Tensor, grid: Tensor, capacity: int, bins: int) -> None:
        """Set a new histogram's width and nb from ``flat`` (at most 2**30 values) and zero
        ``grid``: one launch of count_bins.cu's ``first_range``. Once per histogram and
        collection, so its argument block is built per call."""
        blocks = self._grid_size(flat.numel())
        if flat.numel() > LAUNCH_ELEMENTS or blocks > capacity:
            raise ValueError(f"first_range takes at most {LAUNCH_ELEMENTS} values and a buffer of {blocks}+ bins")
        # As torch divides a device tensor by a host number: times the reciprocal, computed in
        # double and rounded to float.
        values = (ctypes.c_void_p(flat.data_ptr()), ctypes.c_int(flat.numel()), ctypes.c_void_p(state.data_ptr()),
                  ctypes.c_void_p(grid.data_ptr()), ctypes.c_int(capacity), ctypes.c_float(1.0 / bins))
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
        self._launch(self._first_func, flat.numel(), pointers, "first_range")

    def __call__(self, flat: Tensor, state: Tensor, grid: Tensor, capacity: int) -> None:
        """Count a contiguous float32 tensor (as flat memory) into ``grid`` and update ``state``: one launch per 2**30 values."""
        (x, n, _, _, _, last), pointers = self._block(state, grid, capacity)
        total = flat.numel()
        for start in range(0, total, LAUNCH_ELEMENTS):
            size = min(LAUNCH_ELEMENTS, total - start)
            x.value = flat.data_ptr() + 4 * start
            n.value = size
            last.value = int(start + size == total)
            self._launch(self._func, size, pointers, "count_bins")


_KERNELS: dict[tuple[int, ...], _CountKernel | None] = {}


def _kernel_key(index: int) -> tuple[int, ...]:
    return (index, LOCAL_BINS, LOCAL_COPIES, LOADS_PER_STEP, int(DIVIDE_EVERY_VALUE))


def _aligned(flat: Tensor) -> Tensor:
    """``flat`` itself, or a copy when it does not start on 16 bytes: the kernels read 16 bytes
    at a time, and a fresh tensor is aligned."""
    return flat.clone() if flat.data_ptr() % 16 else flat


def _launch_count(flat: Tensor, state: Tensor, grid: Tensor, capacity: int) -> None:
    """Count a contiguous float32 CUDA tensor into ``grid``; update ``state`` (see count_bins.cu)."""
    _KERNELS[_kernel_key(flat.get_device())](_aligned(flat), state, grid, capacity)


def _launch_first_range(flat: Tensor, state: Tensor, grid: Tensor, capacity: int, bins: int) -> None:
    """Set a new histogram's width and nb from a contiguous float32 CUDA tensor of at most
    2**30 values, and zero ``grid`` (see count_bins.cu's ``first_range``)."""
    _KERNELS[_kernel_key(flat.get_device())].first_range(_aligned(flat), state, grid, capacity, bins)


def _kernels_work(device: torch.device) -> bool:
    """Compile the kernels once per GPU and check them on known cases.

    A torch without NVRTC, a compile or launch failure, or a wrong count then costs a
    warning and the torch-op path, not a wrong histogram.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = _kernel_key(index)
    if key in _KERNELS:
        return _KERNELS[key] is not None
    try:
        device = torch.device("cuda", index)
        _KERNELS[key] = _CountKernel(device)
        x = torch.tensor([0.0, 0.5, 1.5, 2.0, 4.0, 4.0, 300.0, 3000.25, 6000.0], device=device)
        state = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0], device=device)  # width 1, nb 2
        grid = torch.zeros(NEAR_BINS, device=device)
        _launch_count(x, state, grid, NEAR_BINS)
        # Bins 0 (0, 0.5), 1, 2, 4 (twice) and 300 in shared memory; 3000 past it (a global
        # atomic); 6000 lies on the new top edge (nb becomes 6000): it folds into 5999.
        expected = torch.zeros(NEAR_BINS)
        for b, count in ((0, 2), (1, 1), (2, 1), (4, 2), (300, 1), (3000, 1), (5999, 1)):
            expected[b] = count
        ok = torch.equal(grid.cpu(), expected) and state.cpu().tolist() == [1.0, 6000.0, 6000.0, 0.0, 0.0]
        # Many blocks, a third of the values zero (one popular bin), a length that is not a
        # multiple of four, and values in and past the shared-memory bins.
        n = 7 * COUNT_MIN_VALUES_PER_BLOCK + 3
        many = (torch.arange(n) % 5100).float() + 0.25
        many[::3] = 0.0
        state = torch.tensor([1.0, 5100.0, 0.0, 0.0, 0.0], device=device)
        grid = torch.zeros(NEAR_BINS, device=device)
        _launch_count(many.to(device), state, grid, NEAR_BINS)
        expected = torch.bincount(many.long(), minlength=NEAR_BINS).float()
        ok = ok and torch.equal(grid.cpu(), expected) and state.cpu().tolist() == [1.0, 5100.0, 5099.25, 0.0, 0.0]
        # A first range over the same blocks, its max in the tail, 1000 bins (not a power of
        # two): the torch ops' width and nb, a zeroed buffer; and NaN stays NaN.
        many[-1] = 9000.5
        values, top = many.to(device), torch.tensor(9000.5, device=device)
        width = torch.div(top, 1000)
        state = torch.tensor([0.0, 0.0, 7.0, 1.0, 0.0], device=device)
        grid = torch.ones(NEAR_BINS, device=device)
        _launch_first_range(values, state, grid, NEAR_BINS, 1000)
        ok = ok and not grid.any().item() and torch.equal(
            state, torch.stack([width, torch.div(top, width), *torch.zeros(3, device=device)]))
        values[5] = float("nan")
        _launch_first_range(values, state, grid, NEAR_BINS, 1000)
        ok = ok and bool(state[:2].isnan().all().item())
        if not ok:
            log.warning("the CUDA histogram kernels gave wrong counts on this GPU; using torch ops")
    except Exception as exc:  # noqa: BLE001 - any failure means: use the torch ops
        log.warning("CUDA histogram kernels unavailable (%s); using torch ops", exc)
        ok = False
    if not ok:
        _KERNELS[key] = None
    return ok


def kernels_available(device: torch.device) -> bool:
    """Whether the CUDA counting kernels serve tensors on ``device`` (checked once per GPU)."""
    if device.type != "cuda" or os.environ.get(BACKEND_ENV, "").lower() == "torch":
        return False
    return _kernels_work(device)


def capacity_for(num_bins: int) -> int:
    """Buffer size for a histogram of ``num_bins`` bins, with room to double.

    Above :data:`NEAR_BINS`, a size is ``NEAR_BINS + 2**k``. The far ``histc`` then spans
    a power of two as well, and keeps bin ``floor(t)`` exact.
    """
    need = 2 * max(1, num_bins)
    if need <= NEAR_BINS:
        return NEAR_BINS
    far = NEAR_BINS
    while NEAR_BINS + far < need:
        far *= 2
    return NEAR_BINS + far


def _bins_to_tensor(values: Any) -> Tensor | None:
    if values is None or isinstance(values, Tensor):
        return values
    return torch.as_tensor(values)


class SyncFreeHistogramCalibrator(calib.HistogramCalibrator):
    """pytorch-quantization's ``torch_hist`` histogram calibrator, without host syncs.

    The statistics live on the device in a count buffer with a fixed capacity (see the
    module docstring). The library's attributes ``_calib_hist``, ``_calib_bin_edges`` and
    ``_num_bins`` are properties. Reading them builds the library's form once per
    collection step. Writing them, as :mod:`.calib_state`'s import does, replaces the
    statistics, and the next ``collect`` adopts them. Settings that our rules never use
    (``skip_zeros``, ``torch_hist=False``) fall back to the library's own collect.
    """

    def __init__(
        self,
        num_bits: int = 8,
        axis: Any = None,
        unsigned: bool = False,
        num_bins: int = DEFAULT_BINS,
        grow_method: Any = None,
        skip_zeros: bool = False,
        torch_hist: bool = True,
    ) -> None:
        # The library form: what the properties hand out. It is authoritative while
        # ``_on_device`` is False, and a cache of the device form otherwise.
        self._lib: dict[str, Any] = {"hist": None, "edges": None, "num_bins": num_bins}
        self._lib_valid = True
        self._on_device = False
        self._first_bins = num_bins
        self._grid: Tensor | None = None  # counts, ``capacity`` bins, zero past ``nb``
        self._scalars: Tensor | None = None  # [bin width, nb] on the device
        self._width: Tensor | None = None  # views of the two scalars
        self._nb: Tensor | None = None
        self._slot: Tensor | None = None  # a session's row for the scalars, if bound
        self._ready = False  # saw a tensor (host-side flag: no sync to know it)
        self._sizing = True  # in its first batch: make room before a repeated call (see _collect_kernels)
        self._capacity = 0
        self._min_capacity = 0
        self.order: int | None = None  # first-call position within a batch (session sets it)
        self.session: CollectSession | None = None
        self.muted = False
        super().__init__(num_bits, axis, unsigned, num_bins=num_bins, grow_method=grow_method,
                         skip_zeros=skip_zeros, torch_hist=torch_hist)

    # --------------------------------------------------------- the library's attributes
    def _library_form(self, scalars: Sequence[float] | None = None) -> dict[str, Any]:
        if not self._lib_valid:
            self._lib = self._materialize(scalars)
            self._lib_valid = True
        return self._lib

    def _set_library(self, key: str, value: Any) -> None:
        if self._on_device:
            self._library_form()  # keep the fields not being set
            self._on_device = False
            self._ready = False
            self._grid = None
        self._lib[key] = value

    @property
    def _calib_hist(self) -> Any:
        return self._library_form()["hist"]

    @_calib_hist.setter
    def _calib_hist(self, value: Any) -> None:
        self._set_library("hist", value)

    @property
    def _calib_bin_edges(self) -> Any:
        return self._library_form()["edges"]

    @_calib_bin_edges.setter
    def _calib_bin_edges(self, value: Any) -> None:
        self._set_library("edges", value)

    @property
    def _num_bins(self) -> int:
        return self._library_form()["num_bins"]

    @_num_bins.setter
    def _num_bins(self, value: int) -> None:
        self._set_library("num_bins", value)

    # ------------------------------------------------------------------- conversions
    @classmethod
    def from_calibrator(cls, other: calib.HistogramCalibrator) -> SyncFreeHistogramCalibrator:
        """A sync-free calibrator holding ``other``'s settings and statistics."""
        hist, edges = other._calib_hist, other._calib_bin_edges
        first = getattr(other, "_first_bins", None)
        if first is None:
            # A fresh library calibrator still has the bin count it was made with. One
            # that already holds a histogram may have grown; TensorQuantizer makes 2048.
            first = other._num_bins if hist is None else min(DEFAULT_BINS, int(other._num_bins))
        new = cls(other._num_bits, other._axis, other._unsigned, num_bins=int(first),
                  skip_zeros=other._skip_zeros, torch_hist=other._torch_hist)
        if hist is not None:
            new._lib = {"hist": hist, "edges": edges, "num_bins": int(other._num_bins)}
        return new

    def to_library(self, scalars: Sequence[float] | None = None) -> calib.HistogramCalibrator:
        """A plain pytorch-quantization calibrator with these statistics.

        ``scalars`` are the current [bin width, nb] when the caller already read them (a
        session reads all calibrators' at once); otherwise they are read here (one sync).
        """
        lib = self._library_form(scalars)
        plain = calib.HistogramCalibrator(self._num_bits, self._axis, self._unsigned,
                                          num_bins=self._first_bins, skip_zeros=self._skip_zeros,
                                          torch_hist=self._torch_hist)
        plain._calib_hist, plain._calib_bin_edges, plain._num_bins = lib["hist"], lib["edges"], lib["num_bins"]
        plain._first_bins = self._first_bins  # lets a later conversion pick the same edge form
        return plain

    def _materialize(self, scalars: Sequence[float] | None = None) -> dict[str, Any]:
        """The library's form of the device statistics (one sync unless ``scalars`` are given)."""
        if not self._ready:
            return {"hist": None, "edges": None, "num_bins": self._first_bins}
        width_value, nb_value = self._scalars[:2].tolist() if scalars is None else scalars[:2]
        if not (math.isfinite(width_value) and math.isfinite(nb_value)) or width_value <= 0:
            raise CalibrationError(
                "histogram statistics are unusable (non-finite activations, or only zeros in the first "
                f"tensor): bin width {width_value}, bins {nb_value}"
            )
        nb = int(nb_value)
        if nb > self._capacity:
            raise CalibrationError(f"histogram grew to {nb} bins past its buffer of {self._capacity}")
        hist = self._grid[:nb].clone()
        if nb == self._first_bins:
            # The library's first range: linspace(0, max0) on the CPU, max0 = nb * width.
            edges = torch.linspace(0, width_value * nb, nb + 1)
        else:
            # After growth: the library's own arange(0, max + width, width) on the device,
            # with an end that gives exactly nb + 1 edges.
            edges = torch.arange(0, (nb + 0.5) * width_value, width_value, dtype=torch.float32,
                                 device=self._grid.device)
        return {"hist": hist, "edges": edges, "num_bins": nb}

    def _adopt_library_form(self, device: torch.device) -> None:
        """Make the device form from the library form (after construction, reset or import)."""
        lib = self._lib
        hist = _bins_to_tensor(lib["hist"])
        self._on_device = True
        self._lib_valid = True  # still describes the statistics until the next collect
        if hist is None:
            self._ready = False
            self._grid = None
            return
        edges = _bins_to_tensor(lib["edges"])
        nb = int(hist.numel())
        width = (edges[1] - edges[0]).to(device=device, dtype=torch.float32)
        self._allocate(device, max(capacity_for(nb), self._min_capacity))
        self._grid[:nb] = hist.to(device=device, dtype=torch.float32)
        self._width.copy_(width)
        self._nb.fill_(float(nb))
        self._extra.zero_()
        self._ready = True
        self._sizing = True

    def _allocate(self, device: torch.device, capacity: int, zeroed: bool = True) -> None:
        """A count buffer of ``capacity`` bins (left unset when ``zeroed`` is False: the
        CUDA kernel's first range zeroes it in the same launch) and the scalars' row."""
        self._capacity = capacity
        make = torch.zeros if zeroed else torch.empty
        self._grid = make(capacity, dtype=torch.float32, device=device)
        if self._slot is not None and self._slot.device == device:
            self._bind(self._slot)
        else:
            self._bind(torch.zeros(STATE_WIDTH, dtype=torch.float32, device=device))

    def _bind(self, scalars: Tensor) -> None:
        """Hold the scalars in ``scalars`` (a session's row, or our own), with views made once:
        a view per call would be one more host-side op on every collect.

        The row is [bin width, nb, running max of |x| / width, non-finite seen, blocks done];
        the last three serve the CUDA kernel, which updates nb after counting.
        """
        self._scalars = scalars
        self._width, self._nb, self._extra = scalars[0], scalars[1], scalars[2:4]

    def grow(self, capacity: int) -> None:
        """Enlarge the count buffer to ``capacity`` bins, keeping the counts (async)."""
        if capacity <= self._capacity or self._grid is None:
            return
        grid = torch.zeros(capacity, dtype=torch.float32, device=self._grid.device)
        grid[: self._capacity] = self._grid
        self._grid, self._capacity = grid, capacity

    # ----------------------------------------------------------------------- collect
    def reset(self) -> None:
        """Forget the statistics, as the library's reset does.

        The library keeps its (possibly grown) bin count across a reset, and its next first
        range then has that many bins; so do we.
        """
        try:
            num_bins = self._num_bins
        except CalibrationError:  # poisoned statistics: start from the original bin count
            num_bins = self._first_bins
        self._on_device = False
        self._ready = False
        self._sizing = True
        self._grid = None
        self._first_bins = int(num_bins)
        self._lib = {"hist": None, "edges": None, "num_bins": self._first_bins}
        self._lib_valid = True

    def __repr__(self) -> str:
        # The library's repr formats from __dict__, where the statistics no longer live.
        where = "device" if self._on_device else "library form"
        return (f"{type(self).__name__}(num_bits={self._num_bits}, unsigned={self._unsigned}, "
                f"first_bins={self._first_bins}, ready={self._ready}, {where})")

    __str__ = __repr__

    def collect(self, x: Tensor) -> None:
        """Add ``|x|`` to the histogram with device ops only (see the module docstring)."""
        if self.muted:
            return
        if self.order is None and self.session is not None:
            self.order = self.session.next_order()
        if self._skip_zeros or not self._torch_hist or self._axis is not None:
            return super().collect(x)  # settings our rules never use: the library's path
        if x.numel() == 0:
            return  # the library fails on an empty tensor; nothing to count
        if not self._on_device:
            self._adopt_library_form(x.device)
        self._lib_valid = False
        kernels = self.session.use_kernels if self.session is not None else kernels_available(x.device)
        if not self._ready:  # the kernel's first range zeroes the buffer itself
            self._allocate(x.device, max(capacity_for(self._first_bins), self._min_capacity), zeroed=not kernels)
        if kernels:
            self._collect_kernels(x)
        else:
            self._collect_torch(x)

    def _make_room(self, bins: Callable[[], Tensor]) -> None:
        """Before a repeated call in the calibrator's first batch, enlarge its buffer.

        In a session: to hold FIRST_BATCH_GROWTH-fold growth, without asking the device; the
        session's end_batch redoes the batch for a calibrator that outgrew even that. Alone
        (nothing would redo a batch): to the ``bins()`` the call needs, read with a sync.
        """
        if self.session is not None:
            self.grow(capacity_for(FIRST_BATCH_GROWTH * self._first_bins))
            return
        needed = float(bins())
        if math.isfinite(needed) and needed > self._capacity:
            self.grow(capacity_for(int(needed)))

    def _collect_kernels(self, x: Tensor) -> None:
        """One launch of count_bins.cu: it reads ``x`` once, counts it, then updates nb and
        folds the top edge. A first call launches ``first_range`` before it."""
        flat = x if x.is_contiguous() else x.contiguous()  # the kernels read it as flat memory
        if flat.dtype != torch.float32:
            flat = flat.float()  # the kernels read float32; the torch ops count in float32 too
        if not self._ready:
            if flat.numel() <= LAUNCH_ELEMENTS:
                _launch_first_range(flat, self._scalars, self._grid, self._capacity, self._first_bins)
            else:  # more than one launch's worth: the same range from torch ops
                self._start_range(torch.linalg.vector_norm(flat, float("inf")))  # max |x|, no temporary
                self._extra.zero_()
                self._grid.zero_()
            self._ready = True
        elif self._sizing:
            self._make_room(lambda: torch.maximum(
                self._nb, torch.div(torch.linalg.vector_norm(flat, float("inf")), self._width).ceil_()))
        _launch_count(flat, self._scalars, self._grid, self._capacity)

    def _collect_torch(self, x: Tensor) -> None:
        """torch ops: abs, divide, max, clamp to nb - 0.5, histc (CPU, or no CUDA kernel)."""
        width, nb = self._width, self._nb
        chunked = x.numel() > CHUNK_ELEMENTS and x.is_contiguous()
        if chunked:
            top = torch.linalg.vector_norm(x, float("inf")).float()  # max |x|, no temporary
            pieces: Iterator[Tensor] = iter(x.reshape(-1).split(CHUNK_ELEMENTS))
            t = None
        else:
            t = x.abs()
            if t.dtype != torch.float32:
                t = t.float()
            top = torch.amax(t)
        if not self._ready:
            self._start_range(top)
            limit: Tensor | float = self._first_bins - 0.5
            self._ready = True
        else:
            torch.maximum(nb, torch.div(top, width).ceil_(), out=nb)
            limit = nb - 0.5
            if self._sizing:
                self._make_room(lambda: nb)
        if t is not None:
            self._add(t.div_(width).clamp_(max=limit))
            return
        for piece in pieces:
            t = piece.abs()
            if t.dtype != torch.float32:
                t = t.float()
            self._add(t.div_(width).clamp_(max=limit))

    def _start_range(self, top: Tensor) -> None:
        """The first tensor's range from its max ``top``, with torch ops: the width is
        ``top / first_bins`` and nb is ``top / width``, num_bins exactly, or NaN for a
        non-finite or all-zero tensor (count_bins.cu's ``first_range`` computes the same)."""
        torch.div(top, self._first_bins, out=self._width)
        torch.div(top, self._width, out=self._nb)

    def _add(self, t: Tensor) -> None:
        """Count bin ``floor(t)`` of every value into the buffer: one or two ``histc``."""
        grid, capacity = self._grid, self._capacity
        if capacity == NEAR_BINS:
            grid.add_(torch.histc(t, NEAR_BINS, 0, NEAR_BINS))
            return
        # histc puts its upper edge in its last bin: move exact NEAR_BINS values (bin
        # NEAR_BINS) past the near call's range, inside the far call's first bin.
        t = t.masked_fill_(t == NEAR_BINS, NEAR_BINS + 0.5)
        grid[:NEAR_BINS].add_(torch.histc(t, NEAR_BINS, 0, NEAR_BINS))
        grid[NEAR_BINS:].add_(torch.histc(t, capacity - NEAR_BINS, NEAR_BINS, capacity))


class SyncFreeMaxCalibrator(calib.MaxCalibrator):
    """pytorch-quantization's max calibrator without the ``torch.min(x) < 0`` sync.

    The library takes ``|x|`` only when it found a negative value. The max of ``|x|`` is
    the same either way, so we always take it. A tensor that this calibrator already
    reduced is skipped. That is a weight: the same object, the same version counter and
    the same storage.
    """

    def __init__(self, num_bits: int = 8, axis: Any = None, unsigned: bool = False, track_amax: bool = False):
        super().__init__(num_bits, axis, unsigned, track_amax=track_amax)
        self._seen: tuple[weakref.ref, tuple[int, int]] | None = None
        self._slot: Tensor | None = None  # a session's row: [max of the running max, unused]
        self.order: int | None = None
        self.session: CollectSession | None = None
        self.muted = False

    @classmethod
    def from_calibrator(cls, other: calib.MaxCalibrator) -> SyncFreeMaxCalibrator:
        new = cls(other._num_bits, other._axis, other._unsigned, track_amax=other._track_amax)
        new._calib_amax = other._calib_amax
        if other._track_amax:
            new._amaxs = other._amaxs
        return new

    def to_library(self) -> calib.MaxCalibrator:
        plain = calib.MaxCalibrator(self._num_bits, self._axis, self._unsigned, track_amax=self._track_amax)
        plain._calib_amax = self._calib_amax
        if self._track_amax:
            plain._amaxs = self._amaxs
        return plain

    def reset(self) -> None:
        super().reset()
        self._seen = None

    def collect(self, x: Tensor) -> None:
        """Running absolute max (per channel along ``axis``), device ops only."""
        if self.muted:
            return
        if self.order is None and self.session is not None:
            self.order = self.session.next_order()
        if self._track_amax:
            return super().collect(x)  # keeps a host copy per call by design
        if x.numel() == 0:
            return
        key = (x._version, x.data_ptr())
        if self._seen is not None and self._seen[0]() is x and self._seen[1] == key and self._calib_amax is not None:
            return
        local = self._reduce(x)
        if self._calib_amax is None:
            self._calib_amax = local
        else:
            if local.shape != self._calib_amax.shape:
                raise RuntimeError("amax shape changed!")
            self._calib_amax.copy_(torch.max(self._calib_amax, local).data)
        self._seen = (weakref.ref(x), key)
        slot = self._slot
        if slot is not None and slot.device == self._calib_amax.device:
            if self._calib_amax.dtype == slot.dtype:
                torch.linalg.vector_norm(self._calib_amax, float("inf"), out=slot[0])  # one launch: max of |amax|
            else:
                slot[0] = self._calib_amax.max()

    def _reduce(self, x: Tensor) -> Tensor:
        """pytorch-quantization's ``reduce_amax`` of ``x`` over every dim but ``axis``, in one launch.

        The library takes ``abs`` and then one ``max`` per reduced dim (four launches for a
        conv weight); a first batch reduces 99 weights. The max of ``|x|`` over all of them at
        once is the same value, NaN included, and the shape is the library's: reduced dims
        kept as 1, a single value squeezed to a scalar.
        """
        axis = self._axis if isinstance(self._axis, (list, tuple)) else [self._axis]
        reduce_axis = [i for i in range(x.dim()) if i not in axis]
        if not reduce_axis or not x.is_floating_point():
            return quant_utils.reduce_amax(x, axis=reduce_axis).detach()
        with torch.no_grad():
            local = torch.linalg.vector_norm(x, float("inf"), dim=reduce_axis, keepdim=True)
        return local.squeeze() if local.numel() == 1 else local


SyncFree = (SyncFreeHistogramCalibrator, SyncFreeMaxCalibrator)


def _call_order(entry: "_Entry") -> float:
    order = entry.calibrator.order
    return math.inf if order is None else order


@dataclass
class _Entry:
    name: str
    quantizer: TensorQuantizer
    calibrator: SyncFreeHistogramCalibrator | SyncFreeMaxCalibrator
    first_batch: int | None = None


class CollectSession:
    """Sync-free calibrators on a model's quantizers for one collection, checked per batch.

    Use ``with CollectSession(quantizers, device) as session:``. The session installs
    sync-free twins of the library's histogram and max calibrators, carrying over any
    imported statistics. Around each batch call :meth:`begin_batch` and
    :meth:`end_batch`. On exit the library's own calibrators go back, holding the
    collected statistics, so that amax computation, state export and the saved model see
    plain pytorch-quantization objects. Calibrators of other types are left alone.
    """

    def __init__(self, quantizers: Sequence[tuple[str, TensorQuantizer]], device: torch.device) -> None:
        self.device = torch.device(device)
        self.use_kernels = kernels_available(self.device)  # read once: the check costs per call
        self.entries: list[_Entry] = []
        self._order = 0
        self._snapshot: list[tuple[bool, Tensor | None, int]] = []
        self._snapshot_state: Tensor | None = None
        self._quantizers = list(quantizers)

    # ------------------------------------------------------------------ install/remove
    def __enter__(self) -> CollectSession:
        for name, q in self._quantizers:
            cal = q._calibrator
            if type(cal) is calib.HistogramCalibrator:
                fast = SyncFreeHistogramCalibrator.from_calibrator(cal)
            elif type(cal) is calib.MaxCalibrator:
                fast = SyncFreeMaxCalibrator.from_calibrator(cal)
            elif isinstance(cal, SyncFree):
                fast = cal
                fast.order = None
            else:
                continue  # another calibrator type: it keeps its own behaviour
            q._calibrator = fast
            fast.session = self
            self.entries.append(_Entry(name, q, fast))
        self.state = torch.zeros((len(self.entries), STATE_WIDTH), dtype=torch.float32, device=self.device)
        for row, entry in enumerate(self.entries):
            cal = entry.calibrator
            cal._slot = self.state[row]
            if isinstance(cal, SyncFreeHistogramCalibrator) and cal._ready and cal._scalars is not None:
                # Already collecting on the device with its own scalars: move them to the row.
                cal._slot.copy_(cal._scalars.to(self.device))
                cal._bind(cal._slot)
            if isinstance(entry.calibrator, SyncFreeMaxCalibrator) and entry.calibrator._calib_amax is not None:
                entry.calibrator._seen = None  # imported: re-reduce the weight once, to fill the slot
        log.debug("sync-free calibrators installed on %d quantizers", len(self.entries))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            rows = self.state.tolist()  # every calibrator's scalars in one read, not one each
        except Exception:  # noqa: BLE001 - the device already failed: let each read report it
            if exc_type is None:
                raise
            rows = None
        for i, entry in enumerate(self.entries):
            fast = entry.calibrator
            try:
                if isinstance(fast, SyncFreeHistogramCalibrator):
                    bound = rows is not None and fast._scalars is fast._slot
                    plain = fast.to_library(rows[i] if bound else None)
                else:
                    plain = fast.to_library()
            except CalibrationError:
                if exc_type is None:
                    raise
                # Already failing (non-finite data): leave an empty calibrator behind.
                plain = calib.HistogramCalibrator(fast._num_bits, fast._axis, fast._unsigned)
            entry.quantizer._calibrator = plain

    def next_order(self) -> int:
        self._order += 1
        return self._order

    # ------------------------------------------------------------------------ batches
    def _histograms(self) -> list[tuple[int, SyncFreeHistogramCalibrator]]:
        return [
            (i, e.calibrator) for i, e in enumerate(self.entries)
            if isinstance(e.calibrator, SyncFreeHistogramCalibrator) and e.calibrator._on_device
        ]

    def begin_batch(self) -> None:
        """Keep a device copy of every histogram, so a batch that overflows can be redone."""
        snapshot: list[tuple[bool, Tensor | None, int]] = []
        sources, targets = [], []
        reuse = len(self._snapshot) == len(self.entries)
        for i, entry in enumerate(self.entries):
            cal = entry.calibrator
            grid = cal._grid if isinstance(cal, SyncFreeHistogramCalibrator) and cal._ready else None
            if grid is None:
                snapshot.append((False, None, 0))
                continue
            old = self._snapshot[i][1] if reuse else None
            buffer = old if old is not None and old.shape == grid.shape else torch.empty_like(grid)
            sources.append(grid)
            targets.append(buffer)
            snapshot.append((True, buffer, cal._capacity))
        if sources:
            torch._foreach_copy_(targets, sources)
        if self._snapshot_state is None or self._snapshot_state.shape != self.state.shape:
            self._snapshot_state = torch.empty_like(self.state)
        self._snapshot_state.copy_(self.state)
        self._snapshot = snapshot

    def end_batch(self, batch: int) -> list[int]:
        """Check the batch (one device-to-host copy); return the calibrators to redo.

        Raises :class:`CalibrationError` naming the first quantizer, in call order, whose
        statistics became non-finite, and the batch. Grows half-full buffers.
        """
        values = self.state.tolist()
        bad, zero, redo = [], [], []
        for i, entry in enumerate(self.entries):
            cal = entry.calibrator
            if isinstance(cal, SyncFreeHistogramCalibrator):
                if not (cal._on_device and cal._ready) or cal._slot is not cal._scalars:
                    continue
                if entry.first_batch is None:
                    entry.first_batch = batch
                width, nb = values[i][:2]
                if width == 0.0:
                    zero.append(entry)
                elif not (math.isfinite(width) and math.isfinite(nb)):
                    bad.append(entry)
                elif nb > cal._capacity:
                    cal._min_capacity = capacity_for(int(nb))
                    redo.append(i)
                else:
                    if 2 * nb > cal._capacity:
                        cal.grow(capacity_for(int(nb)))
                    cal._sizing = False
            elif cal._calib_amax is not None and not cal._track_amax:
                if entry.first_batch is None:
                    entry.first_batch = batch
                if not math.isfinite(values[i][0]):
                    bad.append(entry)
        if bad:
            first = min(bad, key=_call_order)
            raise CalibrationError(
                f"non-finite activations at quantizer {first.name} in calibration batch {batch} "
                f"(its running max became NaN or inf; {len(bad)} quantizer(s) affected)"
            )
        if zero:
            first = min(zero, key=_call_order)
            raise CalibrationError(
                f"quantizer {first.name} saw only zeros in its first calibration tensor (batch "
                f"{first.first_batch}): its histogram takes the bin width from that tensor's max, so it has "
                "no range (pytorch-quantization fails the same way on the next nonzero value); exclude it or "
                "calibrate on other data"
            )
        return redo

    def prepare_redo(self, rows: Sequence[int]) -> None:
        """Restore ``rows`` to their state before the batch, enlarged; mute everyone else."""
        redo = set(rows)
        log.info("collecting this batch again for %d histogram(s) that outgrew their buffers: %s",
                 len(redo), ", ".join(self.entries[i].name for i in sorted(redo)[:5]))
        for i, entry in enumerate(self.entries):
            cal = entry.calibrator
            if i not in redo:
                cal.muted = True
                continue
            had, buffer, capacity = self._snapshot[i]
            self.state[i] = self._snapshot_state[i]
            if had:
                cal._grid, cal._capacity = buffer.clone(), capacity
                cal.grow(cal._min_capacity)
                cal._sizing = True
            else:
                cal._ready = False
                cal._sizing = True
                cal._grid = None
                entry.first_batch = None

    def finish_redo(self) -> None:
        for entry in self.entries:
            entry.calibrator.muted = False
