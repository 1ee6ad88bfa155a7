"""The append-only results file: every finished snapshot survives kill -9 of the writer, a reader sees
the file while it is written, a snapshot with another layout is refused."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fisherlab._errors import FisherlabError
from fisherlab.results import ResultsWriter, load, load_factors
from tests._append_worker import factors, snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kill_after", [3, 41])
def test_every_finished_snapshot_survives_kill_9(tmp_path, kill_after: int) -> None:
    """SIGKILL while the writer appends as fast as it can (so mostly mid-write): the file reads back with
    every snapshot the writer had finished, each complete and correct, and its stored factors."""
    out = tmp_path / "r.nc"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests._append_worker", str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    finished = -1
    for line in proc.stdout:
        finished = int(line)
        if finished >= kill_after:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert finished >= kill_after, "the writer died before the kill"
    ds = load(out)
    its = ds["iteration"].values
    assert its[: finished + 1].tolist() == list(range(finished + 1)) and len(its) <= finished + 3
    np.testing.assert_array_equal(ds["frobenius_error"].values[:, 0, 0], its.astype(float))
    np.testing.assert_array_equal(ds["train_loss"].values, its.astype(float))
    a, g = factors(finished)
    d = load_factors(out, iteration=finished, layer="5")
    torch.testing.assert_close(d["a"], a, rtol=0, atol=0)
    torch.testing.assert_close(d["g"], g, rtol=0, atol=0)


def test_a_reader_sees_the_file_while_it_is_written_and_a_new_layout_is_refused(tmp_path) -> None:
    out = tmp_path / "r.nc"
    with ResultsWriter(out, {}) as writer:
        writer.append(snapshot(0))
        writer.append(snapshot(1))
        assert load(out)["iteration"].values.tolist() == [0, 1]
        with pytest.raises(FisherlabError, match="differ from the first snapshot"):
            writer.append(snapshot(2), factors={"5": factors(2)})
        writer.append(snapshot(2))
    assert load(out)["iteration"].values.tolist() == [0, 1, 2]


def _hold_lock_repeatedly(out: str, loops: int, queue: multiprocessing.Queue) -> None:
    """Take and release the output lock of ``out`` ``loops`` times; while holding it, create ``out.owner``
    exclusively, so two holders at once collide. Reports (acquisitions, collisions)."""
    owner = out + ".owner"
    held = collisions = 0
    for _ in range(loops):
        try:
            writer = ResultsWriter(out, {}, overwrite=True)
        except FisherlabError:
            continue
        held += 1
        try:
            os.close(os.open(owner, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.unlink(owner)
        except FileExistsError:
            collisions += 1
        writer.close()
    queue.put((held, collisions))


def test_output_lock_is_exclusive_across_processes(tmp_path) -> None:
    """Three processes looping on one output never hold its lock at the same time (issue 20 item 2: deleting
    the lock file on release let a process lock the deleted file while another locked a new one), and the
    lock file is gone once nobody holds it."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    out = str(tmp_path / "r.nc")
    procs = [ctx.Process(target=_hold_lock_repeatedly, args=(out, 3000, queue)) for _ in range(3)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join()
    assert sum(held for held, _ in results) > 100  # the processes did contend
    assert sum(collisions for _, collisions in results) == 0, results
    assert not Path(out + ".lock").exists()
