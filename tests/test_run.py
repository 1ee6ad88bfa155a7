"""fisherlab.run, the probe API's former home, re-exports the modules it was split into (issue 17)."""

from __future__ import annotations

import fisherlab as fl
from fisherlab import fisher_probe, launch, probe_loop, run


def test_the_former_import_paths_name_the_same_objects() -> None:
    assert run.FisherProbe is fisher_probe.FisherProbe is fl.FisherProbe
    assert run.probe_training is probe_loop.probe_training is fl.probe_training
    assert run.run_probe is probe_loop.run_probe is fl.run_probe
    assert run.USER_LOOP is fisher_probe.USER_LOOP and run.USER_LOOP_CONFIG is fisher_probe.USER_LOOP_CONFIG
    assert run.resolve_layers is launch.resolve_layers and run.check_memory is launch.check_memory
    assert set(run.__all__) <= set(dir(run))
