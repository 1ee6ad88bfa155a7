"""The probe API under its former home: ``from fisherlab.run import FisherProbe, probe_training, run_probe``
keeps working. The code lives in modules named for what each part is:

* :mod:`fisherlab.fisher_probe` — :class:`FisherProbe`, probing inside any training loop;
* :mod:`fisherlab.probe_loop` — :func:`probe_training` (a training loop around it) and
  :func:`run_probe` (``fisherlab probe`` on a paper problem);
* :mod:`fisherlab.snapshot` — one snapshot (probe pass, every method and metric) as one dataset row;
* :mod:`fisherlab.launch` — the checks before a run (layers, memory) and the ``torchrun`` process group;
* :mod:`fisherlab.probe` — :class:`~fisherlab.probe.Probe`, the hooks that capture the per-sample factors.
"""

from __future__ import annotations

from fisherlab.fisher_probe import USER_LOOP, USER_LOOP_CONFIG, FisherProbe
from fisherlab.launch import available_bytes, check_memory, resolve_layers, snapshot_bytes
from fisherlab.probe_loop import probe_training, run_probe

__all__ = [
    "USER_LOOP",
    "USER_LOOP_CONFIG",
    "FisherProbe",
    "available_bytes",
    "check_memory",
    "probe_training",
    "resolve_layers",
    "run_probe",
    "snapshot_bytes",
]
