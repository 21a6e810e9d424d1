"""Suite-wide settings.

One intra-op thread: the suite runs on 2-core machines where torch's default thread pool oversubscribes the
cores (a 100-step test measured 23 s with 2 threads vs 0.6 s with 1), and single-threaded CPU kernels keep
bitwise comparisons (exact resume, twin == singles) independent of the machine's core count.
"""

import os

import pytest
import torch

torch.set_num_threads(1)
# Training runs (in-process and in subprocesses) default to threads=auto, which follows OMP_NUM_THREADS.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def one_thread() -> None:
    """Re-pinned before every test: code under test may change the count (the chain experiment sets its own), and
    a later bit-exact comparison must not depend on which tests ran before it."""
    torch.set_num_threads(1)
