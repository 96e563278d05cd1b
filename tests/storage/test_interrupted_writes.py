"""Interrupted and concurrent writes: recognisable temp files, leftovers removed, no overwrite without force.

The signal tests run the real ``epcli collapse`` in a subprocess and kill it while
it writes shards: SIGKILL leaves a temp file that the next run on the same output
removes; SIGTERM unwinds like Ctrl-C (exit 143) and leaves none. The old output
survives both.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import epcli
from epcli import EPLinear, OutputError
from epcli.jobs.collapse import collapse_file
from epcli.storage.atomic import StagedFiles, atomic_write, remove_leftovers, temp_name
from epcli.storage.source import TensorInfo
from epcli.storage.writer import CheckpointWriter

TEMP = re.compile(r"\..+\.epcli-(\d+)-[0-9a-f]{8}\.tmp")


def _temps(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if TEMP.fullmatch(name))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write(data: bytes):
    return lambda f: f.write(data)


def test_temp_names_say_whose_they_are(tmp_path: Path):
    name = temp_name(tmp_path / "out.safetensors").name
    found = re.fullmatch(r"\.out\.safetensors\.epcli-(\d+)-[0-9a-f]{8}\.tmp", name)
    assert found and int(found.group(1)) == os.getpid()


def test_only_leftovers_of_dead_epcli_runs_on_the_same_output_are_removed(tmp_path: Path):
    dead, alive = _dead_pid(), os.getpid()
    files = {
        f".out.pt.epcli-{dead}-0123abcd.tmp": False,  # removed: ours, on this output, its process is gone
        f".out.pt.epcli-{alive}-0123abcd.tmp": True,  # a live run (here: this one) is writing it
        f".other.pt.epcli-{dead}-0123abcd.tmp": True,  # another output's
        f".out.pt.{dead}.tmp": True,  # not epcli's pattern
        "out.pt.epcli-1-0123abcd.tmp": True,  # not hidden: not a name epcli makes
    }
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    atomic_write(tmp_path / "out.pt", _write(b"new"))
    assert {name: (tmp_path / name).exists() for name in files} == files
    assert (tmp_path / "out.pt").read_bytes() == b"new"
    assert remove_leftovers(tmp_path / "other.pt") == [tmp_path / f".other.pt.epcli-{dead}-0123abcd.tmp"]


def test_no_overwrite_holds_against_a_concurrent_writer(tmp_path: Path):
    """Both runs checked that the output is free; the second to commit loses, and the winner's file stays."""
    target = tmp_path / "out.safetensors"
    first, second = StagedFiles(overwrite=False), StagedFiles(overwrite=False)
    with first, second:
        first.write(target, _write(b"first"))
        second.write(target, _write(b"second"))
        first.commit()
        with pytest.raises(OutputError, match=r"out\.safetensors already exists .*nothing was overwritten"):
            second.commit()
    assert target.read_bytes() == b"first"
    assert _temps(tmp_path) == []


def test_no_overwrite_of_a_set_creates_nothing_when_one_name_is_taken(tmp_path: Path):
    shard, index = tmp_path / "m-00001-of-00001.safetensors", tmp_path / "m.safetensors.index.json"
    index.write_bytes(b"someone else's")
    with StagedFiles(overwrite=False) as staged:
        staged.write(shard, _write(b"shard"))
        staged.write(index, _write(b"index"))
        with pytest.raises(OutputError, match="already exists"):
            staged.commit()
    assert not shard.exists() and index.read_bytes() == b"someone else's"
    assert _temps(tmp_path) == []


def test_checkpoint_writer_without_overwrite(tmp_path: Path):
    path = tmp_path / "out.pt"
    path.write_bytes(b"old")
    layout = {"w": TensorInfo((2,), torch.float32)}
    with CheckpointWriter(path, layout, overwrite=False) as writer:
        writer.add("w", torch.ones(2))
        with pytest.raises(OutputError, match="already exists"):
            writer.commit("{}")
    assert path.read_bytes() == b"old"
    with CheckpointWriter(path, layout) as writer:  # the default replaces, atomically
        writer.add("w", torch.ones(2))
        writer.commit("{}")
    assert path.read_bytes() != b"old"


# ---- real runs, killed while they write -------------------------------------------------------------
def _source(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(*[EPLinear(32, 32, depth=3) for _ in range(12)]).eval()
    return epcli.save_checkpoint(model, tmp_path / "big.safetensors", input_shape=(32,))


def _kill_while_writing(source: Path, output: Path, sig: signal.Signals) -> subprocess.CompletedProcess[str]:
    """Start ``epcli collapse`` into shards; send ``sig`` as soon as its first temp file appears."""
    argv = [sys.executable, "-m", "epcli", "collapse", str(source), "-o", str(output), "--force",
            "--max-shard-size", "5000", "--no-model-check", "--json"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    ours = re.compile(rf"\..+\.epcli-{process.pid}-[0-9a-f]{{8}}\.tmp")
    while process.poll() is None and time.monotonic() < deadline:
        if any(ours.fullmatch(name) for name in os.listdir(output.parent)):
            process.send_signal(sig)
            break
        time.sleep(0.001)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def test_sigkill_leftovers_are_removed_by_the_next_run_and_sigterm_cleans_up(tmp_path: Path):
    source = _source(tmp_path)
    output = tmp_path / "out" / "model.safetensors"
    output.parent.mkdir()
    collapse_file(source, output, model_check=False)  # the old output, one file
    old = output.read_bytes()

    killed = _kill_while_writing(source, output, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    leftovers = _temps(output.parent)
    assert leftovers, "SIGKILL cannot clean up: a temp file stays behind"
    assert sorted(os.listdir(output.parent)) == sorted(["model.safetensors", *leftovers])

    terminated = _kill_while_writing(source, output, signal.SIGTERM)
    assert terminated.returncode == 143, terminated.stderr
    assert "terminated" in terminated.stderr
    assert json.loads(terminated.stdout)["error"]["type"] == "Terminated"  # --json readers get one document
    assert os.listdir(output.parent) == ["model.safetensors"]  # its own temps and the killed run's are gone
    assert output.read_bytes() == old


def test_scratch_directories_go_with_their_staged_files(tmp_path: Path):
    """A scratch directory (files checked together under their final names) is removed on commit and on failure,
    and a dead run's one is removed by the next write, like its temp files."""
    target = tmp_path / "m.onnx"
    leftover = tmp_path / f".m.onnx.epcli-{_dead_pid()}-0123abcd.tmp"
    leftover.mkdir()
    (leftover / "m.onnx.data").write_bytes(b"from a killed run")
    with pytest.raises(RuntimeError), StagedFiles() as staged:
        scratch = staged.scratch(target)
        (scratch / "m.onnx").write_bytes(b"half")
        raise RuntimeError("a failed check")
    assert os.listdir(tmp_path) == []
    with StagedFiles(overwrite=False) as staged:
        scratch = staged.scratch(target)
        (scratch / "m.onnx.data").write_bytes(b"data")
        (scratch / "m.onnx").write_bytes(b"model")
        staged.add(target.with_name("m.onnx.data"), scratch / "m.onnx.data")
        staged.add(target, scratch / "m.onnx")
        staged.commit()
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert target.read_bytes() == b"model"
