"""Make spconv 2.3.8 give correct answers on the CPU.

spconv's CPU gather/scatter races when torch runs several intra-op threads: the same
sparse conv on the same input returns different features from call to call, off by up to
~0.3 on unit-scale data (measured here with 2 threads; with 1 thread every call is
identical; upstream: traveller59/spconv#679). Calibration statistics and BN-fusion checks
are meaningless on such outputs, so every sparse forward on the CPU runs with one thread.
CUDA is unaffected and untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
