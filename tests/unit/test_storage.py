"""The storage seam and the run layout without a server: local paths, file:// URIs, errors."""

from __future__ import annotations

import os

import pytest

from sparkdl import storage
from sparkdl.errors import ConfigError
from sparkdl.rundir import RunLayout

pytestmark = pytest.mark.timeout(60)


def test_layout_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunLayout("runs/x").root == str(tmp_path / "runs" / "x")
    s3 = RunLayout("s3://bucket/runs/x/")
    assert s3.root == "s3://bucket/runs/x" and s3.name == "x"
    assert s3.model_dir == "s3://bucket/runs/x/model"
    assert s3.checkpoint_dir(120) == "s3://bucket/runs/x/checkpoints/step-000000000120"
    assert s3.fence_file == "s3://bucket/runs/x/checkpoints/ATTEMPT"
    assert RunLayout("hdfs://nn:8020/r").spark_model_dir == "hdfs://nn:8020/r/spark_model"
    assert RunLayout("/dbfs/runs/x").run_file == "/dbfs/runs/x/run.json"


def test_local_and_remote_uris_are_told_apart():
    assert storage.is_local("/Volumes/cat/schema/vol/run") and storage.is_local("file:///tmp/x")
    assert storage.local_path("file:///tmp/x") == "/tmp/x"
    for uri in ("s3://b/k", "hdfs://nn/x", "gs://b/x", "abfs://c@a.dfs.core.windows.net/x"):
        assert not storage.is_local(uri) and storage.local_path(uri) is None


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_write_read_list_delete(tmp_path, scheme):
    root = f"{scheme}{tmp_path}/run"
    storage.write_file(f"{root}/a/b.bin", b"payload")
    storage.write_file(f"{root}/a/b.bin", b"second")  # replaced whole
    assert storage.read_file(f"{root}/a/b.bin") == b"second"
    assert storage.list_dir(f"{root}/a") == ["b.bin"]  # no temporary left behind
    assert storage.list_dir(f"{root}/missing") == []
    assert storage.is_dir(root) and storage.path_exists(f"{root}/a/b.bin")
    storage.delete(root)
    assert not storage.path_exists(root)
    storage.delete(root)  # nothing there is fine
    with pytest.raises(FileNotFoundError):
        storage.read_file(f"{root}/a/b.bin")


def test_check_writable_names_the_location(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="run_dir must be a location .*file/run"):
        storage.check_writable(str(blocker / "run"), "run_dir")
    storage.check_writable(str(tmp_path / "new" / "run"), "run_dir")
    assert os.listdir(tmp_path / "new" / "run") == []  # the probe is gone


def test_a_failed_local_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        storage.write_file(str(target), b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["run.json"]
