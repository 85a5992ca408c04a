"""Outputs: atomic writes, clear errors naming the path, and one run per run directory."""
import errno
import fcntl
import json
import subprocess
import sys
from pathlib import Path

import pytest

from anomax.errors import OutputError
from anomax.files import claim_run_dir, write_json_atomic

SECOND_RUN = """
import sys
from anomax.errors import OutputError
from anomax.files import claim_run_dir
try:
    with claim_run_dir(sys.argv[1]):
        print("claimed")
except OutputError as error:
    print(error)
"""


def second_run(run_dir: Path) -> str:
    """What another process gets when it claims ``run_dir``."""
    return subprocess.run([sys.executable, "-c", SECOND_RUN, str(run_dir)], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def test_two_runs_never_share_a_run_directory(tmp_path):
    run_dir = tmp_path / "outputs" / "run"
    with claim_run_dir(run_dir) as claimed:
        assert claimed == run_dir and run_dir.is_dir()
        assert second_run(run_dir).startswith(f"{run_dir} is in use by another anomax run (pid ")
        with pytest.raises(OutputError, match="is in use by another anomax run"):  # in this process too
            with claim_run_dir(run_dir):
                pass
        (run_dir / "metrics.json").write_text("{}")
    # Released, but it now holds a run's outputs: a later run is refused too, and told what is there.
    assert second_run(run_dir).startswith(f"{run_dir} already holds metrics.json: a run writes only into a new")


def test_hydra_files_and_a_killed_runs_lock_do_not_block(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("[]\n")
    (tmp_path / "train.log").write_text("")
    (tmp_path / ".anomax-run.lock").write_text("12345\n")  # its process is gone: the kernel dropped its lock
    assert second_run(tmp_path) == "claimed\n"


def test_a_users_folder_is_not_a_run_directory(tmp_path):
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match=f"{tmp_path} already holds notes.md"):
        with claim_run_dir(tmp_path):
            pass
    assert (tmp_path / "notes.md").read_text() == "mine"


def test_disk_full_leaves_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"summary": 1})

    def disk_full(self, data):
        with open(self, "wb") as handle:
            handle.write(data[:3])  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OutputError, match=f"cannot write {target}: No space left on device"):
        write_json_atomic(target, {"summary": 2})
    assert json.loads(target.read_text()) == {"summary": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"], "no temporary file is left behind"


def test_unwritable_directory_names_the_path(tmp_path):
    (tmp_path / "blocked").write_text("a file where a directory should be")
    target = tmp_path / "blocked" / "metrics.json"
    with pytest.raises(OutputError, match=f"cannot write {target}: Not a directory"):
        write_json_atomic(target, {})


def test_a_file_system_without_locks_still_runs(tmp_path, monkeypatch, caplog):
    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with claim_run_dir(tmp_path / "run") as run_dir:
        (run_dir / "metrics.json").write_text("{}")
    assert "does not support locks" in caplog.text


def test_an_app_holds_its_run_directory_before_hydra_writes_into_it(tmp_path):
    """Two runs started in the same second share the default directory: the second one's Hydra wrote
    .hydra/ over the first one's before its task was refused. The app claims the directory first."""
    from omegaconf import OmegaConf

    from anomax.apps._common import RefuseUsedRunDir

    run_dir = tmp_path / "outputs" / "run"
    callback = RefuseUsedRunDir("anomax-train")
    config = OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "outputs" / ".." / "outputs" / "run")}}})
    callback.on_run_start(config)
    assert second_run(run_dir).startswith(f"{run_dir} is in use by another anomax run (pid ")
    with claim_run_dir(run_dir) as claimed:  # the task's claim takes the app's over
        assert claimed == run_dir
        with pytest.raises(OutputError, match="is in use by another anomax run"):  # once only
            with claim_run_dir(run_dir):
                pass
    assert second_run(run_dir).startswith(f"{run_dir} is in use")  # held to the end of the run
    callback.on_run_end(config)
    assert second_run(run_dir) == "claimed\n"
