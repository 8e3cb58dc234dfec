"""Training runs side by side: a checkpoint folder per run (ml.checkpoint_dirs), serialised compare-and-set
promotion for any tracking store (ml.promotion_lock), and a validated ``training_partition``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ml.checkpoint_dirs import CHECKPOINT_FILE, RunDir, claim_run_dir
from ml.promotion_lock import CHALLENGER, CHAMPION, compare_and_set, promotion_lock
from omnisage_pipeline.training.runner import check_training_partition

REPO = Path(__file__).resolve().parents[2]
FP = "0123456789abcdef"


def _checkpoint(run: RunDir, step: int) -> Path:
    (run.path / CHECKPOINT_FILE).write_text(str(step))
    return run.path / CHECKPOINT_FILE


# ================================================================================== checkpoint folders
def test_two_runs_of_one_config_get_their_own_folders_and_removing_one_keeps_the_other(tmp_path):
    first = claim_run_dir(tmp_path, FP, resume=True)
    _checkpoint(first, 10)
    second = claim_run_dir(tmp_path, FP, resume=True)  # the first is still training: never shared
    assert second.path != first.path and second.resume is None
    assert first.path.parent == second.path.parent == tmp_path
    _checkpoint(second, 20)
    second.remove()  # registered
    second.release()
    assert not second.path.exists()
    assert (first.path / CHECKPOINT_FILE).read_text() == "10"
    # a run that ended without registering (stop_after, an exception) leaves its folder to resume
    first.release()
    third = claim_run_dir(tmp_path, FP, resume=True)
    assert third.path == first.path and third.resume == first.path / CHECKPOINT_FILE
    # ... and only one run gets it: the next one trains in a new folder
    fourth = claim_run_dir(tmp_path, FP, resume=True)
    assert fourth.path not in (third.path, second.path) and fourth.resume is None
    # resume=False never takes another run's folder
    third.release()
    fifth = claim_run_dir(tmp_path, FP, resume=False)
    assert fifth.path != third.path and fifth.resume is None and (third.path / CHECKPOINT_FILE).is_file()
    for run in (fourth, fifth):
        run.release()


CLAIMER = """
import sys
from pathlib import Path
from ml.checkpoint_dirs import claim_run_dir
run = claim_run_dir(Path(sys.argv[1]), sys.argv[2], resume=True)
(run.path / "last.pt").write_text("7")
print(run.path, flush=True)
sys.stdin.readline()
"""


def test_a_killed_runs_folder_is_resumed_only_once_its_process_is_gone(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", CLAIMER, str(tmp_path), FP],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        other = Path(proc.stdout.readline().strip())
        assert (other / CHECKPOINT_FILE).is_file()
        alive = claim_run_dir(tmp_path, FP, resume=True)  # its owner is training: not resumed, not removed
        assert alive.path != other and alive.resume is None
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    alive.release()  # an ended run without a checkpoint: garbage for the next run
    resumed = claim_run_dir(tmp_path, FP, resume=True)
    assert resumed.path == other and resumed.resume == other / CHECKPOINT_FILE
    assert not alive.path.exists()
    resumed.release()


def test_leftovers_of_killed_runs_are_removed_but_never_a_live_runs_folder(tmp_path):
    live = claim_run_dir(tmp_path, FP, resume=True)  # no checkpoint yet, but its run is alive
    for name in (f".removing-{FP}-1.x", f".new-{FP}-2.y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "owner.lock").touch()
    claim_run_dir(tmp_path, FP, resume=True).release()
    assert live.path.is_dir()
    assert not list(tmp_path.glob(".removing-*")) and not list(tmp_path.glob(".new-*"))
    live.release()


# ================================================================================== promotion
class _Registry:
    """An in-memory stand-in for ml.registry.ModelRegistry (aliases and versions only)."""

    def __init__(self):
        self.aliases: dict[str, str] = {}
        self.versions = 0
        self.guard = threading.Lock()

    def version_for_alias(self, alias):
        return self.aliases.get(alias)

    def register(self):
        with self.guard:
            self.versions += 1
            return str(self.versions)

    def set_alias(self, alias, version):
        self.aliases[alias] = version


def test_promotions_racing_on_a_non_sqlite_store_are_serialised(tmp_path):
    """Two trainings gate at once into a tracking server (no sqlite store lock): the second to gate must
    compare against the first's champion, not against the champion both started from."""
    uri = "http://tracking.example:5000"
    registry = _Registry()
    entered = threading.Barrier(2)
    both_read = threading.Barrier(2)
    compared: dict[str, str | None] = {}
    errors: list[BaseException] = []

    def training(name: str) -> None:
        try:
            entered.wait(timeout=30)
            with promotion_lock(tmp_path, uri, "omnisage"):
                previous = registry.version_for_alias(CHAMPION)
                compared[name] = previous
                try:  # without a lock both read the same champion here; with it the other one waits
                    both_read.wait(timeout=1)
                except threading.BrokenBarrierError:
                    pass
                gate = {"alias": CHAMPION, "previous": previous, "decision": "champion: better"}
                gate = compare_and_set(registry, gate)
                version = registry.register()
                registry.set_alias(gate["alias"], version)
        except Exception as exc:  # noqa: BLE001 (reported by the test thread)
            errors.append(exc)

    threads = [threading.Thread(target=training, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    # one gated with no champion, the other against the version the first one promoted
    assert set(compared.values()) == {None, "1"}, compared
    assert registry.version_for_alias(CHAMPION) == "2"


def test_a_promotion_is_refused_when_the_champion_moved_since_the_gate_read_it():
    registry = _Registry()
    registry.set_alias(CHAMPION, "1")
    gate = {"alias": CHAMPION, "previous": "1", "decision": "champion: 0.5 >= 0.4"}
    assert compare_and_set(registry, gate) is gate  # unchanged: promote
    registry.set_alias(CHAMPION, "2")  # another host's training promoted meanwhile
    refused = compare_and_set(registry, gate)
    assert refused["alias"] == CHALLENGER and "v1 to v2" in refused["decision"]
    assert compare_and_set(registry, {**gate, "alias": CHALLENGER})["alias"] == CHALLENGER


def test_promotion_lock_file_lives_under_the_given_home_for_any_store(tmp_path):
    with promotion_lock(tmp_path / "ckpt", "http://tracking.example:5000", "omnisage") as path:
        assert path.parent == tmp_path / "ckpt" and path.is_file()


# ================================================================================== training_partition
@pytest.mark.parametrize("bad", ["2026-01-05/../../etc", "../2026-01-05", "20260105", "2026-1-5", "", "x"])
def test_training_partition_must_be_a_day(bad):
    with pytest.raises(ValueError, match="training_partition"):
        check_training_partition(bad)


def test_training_partition_before_the_first_day_is_refused():
    assert check_training_partition("2026-01-05", "2026-01-01") == "2026-01-05"
    with pytest.raises(ValueError, match="before the first daily partition 2026-01-01"):
        check_training_partition("2025-12-31", "2026-01-01")


def test_the_cli_path_checks_the_partition_before_building_a_path(omnisage_env):
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.training.runner import resolve_training_partition

    with pytest.raises(ValueError, match=r"training_partition.*etc"):
        resolve_training_partition(Settings.from_env(), "2026-01-05/../../etc")
