"""Test-wide settings: one torch thread (tests use small tensors, where a thread pool costs CPU
time without saving wall time; the suite's CPU-time budget is 90 s)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
