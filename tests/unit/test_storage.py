"""ng_jax.storage on local paths (a bucket: tests/e2e/test_gcs_workdir.py, against an emulator)."""

import os

from ng_jax import storage


def test_local_paths_stay_local_and_uris_stay_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.canonical("run/checkpoints") == str(tmp_path / "run" / "checkpoints")
    assert storage.canonical("gs://bucket/run/") == "gs://bucket/run"
    assert storage.is_remote("gs://bucket/run") and not storage.is_remote("gs:bucket") and not storage.is_remote("run")
    assert os.path.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"  # what the jobs join


def test_local_writes_are_whole_appends_append_and_moves_rename(tmp_path):
    path = tmp_path / "a" / "b" / "summary.json"
    storage.write_text(path, "one")  # parents created
    storage.write_text(path, "two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["summary.json"]  # no temporary left
    storage.append_text(tmp_path / "metrics.jsonl", "1\n")
    storage.append_text(tmp_path / "metrics.jsonl", "2\n")
    assert (tmp_path / "metrics.jsonl").read_text() == "1\n2\n"
    assert storage.listdir(tmp_path / "missing") == [] and storage.listdir(tmp_path / "a") == ["b"]
    storage.makedirs(tmp_path / "aside")
    storage.move(tmp_path / "a" / "b", tmp_path / "aside" / "b")
    assert storage.listdir(tmp_path / "a") == [] and (tmp_path / "aside" / "b" / "summary.json").read_text() == "two"
    assert storage.is_file(tmp_path / "aside" / "b" / "summary.json") and storage.is_file(tmp_path, "aside", "b", "summary.json")
    assert not storage.is_file(tmp_path, "aside", "b") and not storage.is_file(tmp_path, "a", "b", "summary.json")
