"""The append-only results file: every finished snapshot survives kill -9 of the writer, a reader sees
the file while it is written, a snapshot with another layout is refused."""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import xarray as xr

from fisherlab import cli
from fisherlab._errors import FisherlabError
from fisherlab.results import ResultsWriter, load, load_factors
from tests._append_worker import append_until_killed, factors, snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kill_after", [3, 41])
def test_every_finished_snapshot_survives_kill_9(tmp_path, kill_after: int) -> None:
    """SIGKILL while the writer appends as fast as it can (so mostly mid-write): the file reads back with
    every snapshot the writer had finished, each complete and correct, and its stored factors. The writer
    is forked from this process (torch already imported), which reads the iterations it reports."""
    out = tmp_path / "r.nc"
    read_end, write_end = os.pipe()
    proc = multiprocessing.get_context("fork").Process(
        target=append_until_killed, args=(out, lambda it: os.write(write_end, f"{it}\n".encode()))
    )
    proc.start()
    os.close(write_end)
    finished = -1
    with os.fdopen(read_end) as reports:
        for line in reports:
            finished = int(line)
            if finished >= kill_after:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
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


def _written(path: Path, snapshots: int) -> bytes:
    """A finished results file of ``snapshots`` snapshots with stored factors; returns its bytes."""
    with ResultsWriter(path, {"title": "damage test"}) as writer:
        for it in range(snapshots):
            writer.append(snapshot(it), factors={"5": factors(it)})
    return path.read_bytes()


def _flipped(data: bytes) -> bytes:
    out, rng = bytearray(data), random.Random(0)
    for i in rng.sample(range(2000, len(data)), 200):
        out[i] ^= 0xFF
    return bytes(out)


DAMAGES = {  # name -> what is done to the bytes of a good file
    "truncated to an eighth": lambda data: data[: len(data) // 8],
    "200 flipped bytes": _flipped,
    "zeroed superblock": lambda data: data[:8] + bytes(40) + data[48:],
    "bad signature": lambda data: b"XXXX" + data[4:],
}


def _info_to_file(path: Path, err: Path) -> None:
    """``fisherlab info path`` with stderr written to ``err`` (run in a forked process); exits with its status."""
    with err.open("w") as stream:
        sys.stderr = stream
        status = cli.main(["info", str(path)])
    sys.exit(status)


def test_damaged_files_are_one_error_line_not_a_hang(tmp_path, capsys) -> None:
    """Truncated, flipped, bad superblock or signature: load, load_factors, info and plot each give one line
    naming the file, within seconds (issue 20 item 3: a truncated file made the SWMR reader retry forever;
    others gave h5py RuntimeError tracebacks). A netCDF4 file without a method dim: one line from plot."""
    good = _written(tmp_path / "good.nc", 5)
    bad = tmp_path / "bad.nc"
    bad.write_bytes(DAMAGES["truncated to an eighth"](good))
    hang = multiprocessing.get_context("fork").Process(  # the hang first, in a process that can be given up on
        target=_info_to_file, args=(bad, tmp_path / "info.err")
    )
    hang.start()
    hang.join(timeout=60)
    if hang.exitcode is None:
        hang.kill()
        hang.join()
        pytest.fail(f"fisherlab info {bad} still reads after 60 s")
    stderr = (tmp_path / "info.err").read_text()
    assert hang.exitcode == 2 and stderr.startswith(f"fisherlab: error: cannot read {bad}"), stderr
    assert len(stderr.strip().splitlines()) == 1
    for name, damage in DAMAGES.items():
        bad.write_bytes(damage(good))
        with pytest.raises(FisherlabError, match=f"cannot read .*{bad}"):
            load(bad)
        if name != "bad signature":  # not HDF5 at all: "holds no stored factors"
            with pytest.raises(FisherlabError, match=f"cannot read factors from {bad}"):
                load_factors(bad, iteration=4, layer="5")
        for command in ("info", "plot"):
            assert cli.main([command, str(bad)]) == 2, (name, command)
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("fisherlab: error: ") and str(bad) in err[0], (name, err)
    xr.Dataset({"frobenius_error": (("iteration", "layer"), np.ones((2, 1)))}).to_netcdf(bad, engine="h5netcdf")
    assert cli.main(["plot", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method" in err[0] and str(bad) in err[0], err


def _full_disk_after(monkeypatch: pytest.MonkeyPatch, flushes: int) -> None:
    """h5py's file flush fails with ENOSPC from the ``flushes``-th call on, as on a full disk."""
    real, calls = h5py.File.flush, [0]

    def flush(self: h5py.File) -> None:
        calls[0] += 1
        if calls[0] >= flushes:
            raise OSError(
                errno.ENOSPC,
                "Unable to flush file (file write failed: errno = 28, error message = 'No space left on device')",
            )
        real(self)

    monkeypatch.setattr(h5py.File, "flush", flush)


@pytest.mark.parametrize(("flushes", "kept"), [(1, None), (6, [0, 1])])
def test_a_full_disk_is_one_line_and_keeps_finished_snapshots(tmp_path, monkeypatch, capsys, flushes, kept) -> None:
    """A write failure (ENOSPC) at the first snapshot or a later one: one line, exit 2, no lock left, and
    the file holds every finished snapshot and reads back, or is not there when none had finished (issue 20
    item 4: tracebacks, a stale lock, a half-made file that later read as "not open for SWMR writing")."""
    _full_disk_after(monkeypatch, flushes)  # creation flushes once, each snapshot twice
    out = tmp_path / "r.nc"
    args = ["probe", "--iterations", "6", "--every", "1", "--methods", "kfac", "--metrics", "frobenius_error"]
    assert cli.main([*args, "--out", str(out), "--no-progress", "--figure", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fisherlab: error: cannot write ") and "No space left on device" in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "r.nc.lock").exists()
    monkeypatch.undo()
    if kept is None:
        assert not out.exists()
    else:
        assert list(load(out)["iteration"].values) == kept


def test_stale_tmp_files_of_a_killed_run_are_removed(tmp_path) -> None:
    """`<out>.<pid>.tmp` left by kill -9 of `train` goes when the next run takes the output (issue 20 item 6);
    other files are kept."""
    (tmp_path / "t.nc.4242.tmp").write_text("half an epoch")
    (tmp_path / "t.nc.notes.tmp").write_text("mine")
    ResultsWriter(tmp_path / "t.nc", {}).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.nc.notes.tmp"]


def _wait_until_importing_torch(pid: int, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` has mapped libtorch (``import fisherlab`` is under way), on Linux."""
    import time

    maps = Path(f"/proc/{pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:
            return  # no /proc (or the process is gone): send at once
        time.sleep(0.01)


def test_closed_pipe_and_early_ctrl_c_print_no_traceback(tmp_path) -> None:
    """`fisherlab info f | head -1` and Ctrl-C while the command still imports: no traceback (issue 20 item 6)."""
    path = tmp_path / "r.nc"
    _written(path, 2)
    command = [sys.executable, "-m", "fisherlab", "info", str(path)]
    early = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    piped = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert piped.stdout is not None
    piped.stdout.close()  # the reader is gone before the first line
    _wait_until_importing_torch(early.pid)  # a Ctrl-C before Python's own start-up is Python's, not ours
    early.send_signal(signal.SIGINT)
    _, early_err = early.communicate(timeout=60)
    _, piped_err = piped.communicate(timeout=60)
    assert early.returncode in (-signal.SIGINT, 130) and "Traceback" not in early_err, early_err
    assert piped.returncode == 141 and piped_err == b"", piped_err
