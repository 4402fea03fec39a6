"""Test-suite settings: offline, and one thread per process.

The tests run tiny models, where a second intra-op thread only adds synchronisation; on a busy
2-core machine two spinning threads per process slow a test down by an order of magnitude.
Subprocesses started by tests inherit the environment variables.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
