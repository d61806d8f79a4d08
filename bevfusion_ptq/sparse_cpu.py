"""Make spconv 2.3.8 give correct answers on the CPU, whichever spconv build is installed.

Two problems, one place:

* spconv's CPU gather/scatter races when torch runs several intra-op threads: the same
  sparse conv on the same input returns different features from call to call, off by up to
  ~0.3 on unit-scale data (measured here with 2 threads; with 1 thread every call is
  identical; upstream: traveller59/spconv#679). Calibration statistics and BN-fusion checks
  are meaningless on such outputs, so every sparse forward on the CPU runs with one thread.
* A CUDA build of spconv gives every conv built without ``algo`` the MaskImplicitGemm
  algorithm, whose index generation asserts ``implicit gemm only support cuda`` for CPU
  tensors. A user who runs ``--device cpu`` on a GPU host (to keep the GPU free) would
  crash in the lidar branch. While sparse convs run on the CPU they use the Native
  algorithm (the only one a CPU build has); on CUDA each conv keeps the algorithm it was
  built with, so CUDA is not slowed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from spconv.core import ConvAlgo
from spconv.pytorch.conv import SparseConvolution
from torch import nn


@contextmanager
def serial_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the block with one torch thread when ``device`` is the CPU; restore afterwards."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def sparse_convs_on(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``module``'s sparse convs correctly on ``device``: on the CPU with one thread and
    the Native algorithm, each conv's own algorithm restored afterwards; on CUDA untouched."""
    if device.type != "cpu":
        yield
        return
    convs = [m for m in module.modules() if isinstance(m, SparseConvolution) and m.algo != ConvAlgo.Native]
    own = [m.algo for m in convs]
    for conv in convs:
        conv.algo = ConvAlgo.Native
    try:
        with serial_on_cpu(device):
            yield
    finally:
        for conv, algo in zip(convs, own):
            conv.algo = algo
