"""One layer at a time: S3 clients retry (counted at a loopback socket that hangs up on every
connection), the retry settings survive pickling (as Ray ships the filesystem), the result
line round-trips, and storage errors are found behind Ray Train's wrappers."""

from __future__ import annotations

import pickle
import socket
import threading

import pytest
import ray.train

from workers.outcome import (
    error_record,
    read_result_line,
    record_result,
    result_line,
    storage_cause,
)
from workers.storage import RetryingS3FileSystem, S3Settings, write_bytes

pytestmark = [pytest.mark.unit, pytest.mark.fault]


class HangUp:
    """Accepts connections on loopback and closes each at once; counts them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.count = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def hangup():
    h = HangUp()
    yield h
    h.close()


def settings(endpoint: str, attempts: int) -> S3Settings:
    return S3Settings(endpoint, "us-east-1", "key", "secret", max_attempts=attempts)


def connections(attempts: int, request) -> int:
    """Connections that one failing request makes with ``max_attempts=attempts``. (The HTTP
    layer adds one reconnect of its own to a connection closed without a reply, so a single
    try shows 2; the retries are the difference.)"""
    h = HangUp()
    try:
        with pytest.raises(Exception) as info:
            request(settings(h.endpoint, attempts))
        assert storage_cause(info.value) is not None  # counted as a storage error
        return h.count
    finally:
        h.close()


def test_pyarrow_filesystem_retries_and_keeps_its_retries_once_pickled():
    def write(s: S3Settings) -> None:
        fs = pickle.loads(pickle.dumps(s.filesystem()))  # as Ray ships it to its workers
        assert isinstance(fs, RetryingS3FileSystem) and fs.settings == s
        write_bytes(fs, "bucket/key", b"x")

    assert connections(5, write) - connections(1, write) == 4


def test_boto3_client_retries():
    def put(s: S3Settings) -> None:
        s.boto3_client().put_object(Bucket="bucket", Key="key", Body=b"x")

    assert connections(5, put) - connections(1, put) == 4


def test_settings_round_trip_through_the_environment():
    s = settings("http://127.0.0.1:9", 7)
    assert S3Settings.from_env(s.to_env()) == s


def test_the_result_line_round_trips_and_the_last_one_wins():
    first = {"status": "failed", "error": {"type": "OSError", "message": "refused\nover lines"}}
    last = {"status": "succeeded", "step": 24}
    text = "\n".join(["noise", result_line(first), "GREENMIM_RESULT {torn", result_line(last), ""])
    assert read_result_line(text) == last
    assert read_result_line("2026 INFO x: " + result_line(first)) == first  # after a log prefix
    assert read_result_line("nothing here") is None and read_result_line(None) is None


def test_record_result_falls_back_to_the_log_line(hangup, capsys):
    fs = settings(hangup.endpoint, 1).filesystem()
    waits: list[float] = []
    result = {"status": "failed", "error": {"type": "ControllerError", "message": "boom"}}
    assert record_result(fs, "bucket/acme/j1", result, tries=3, sleep=waits.append) is False
    assert waits == [2.0, 4.0]  # three tries, doubling backoff between
    assert read_result_line(capsys.readouterr().out) == {**result, "result_json": False}


def test_record_result_writes_result_json(tmp_path, capsys):
    from pyarrow.fs import LocalFileSystem

    from workers.artifacts import read_result

    result = {"status": "succeeded", "step": 3}
    assert record_result(LocalFileSystem(), str(tmp_path), result) is True
    assert read_result(LocalFileSystem(), str(tmp_path)) == result
    assert read_result_line(capsys.readouterr().out)["result_json"] is True


def test_storage_causes_are_found_behind_ray_trains_wrappers():
    refused = OSError("AWS Error NETWORK_CONNECTION: Could not connect")
    assert storage_cause(ray.train.ControllerError(refused)) is refused
    group = ray.train.WorkerGroupError("rank 0 failed", {0: RuntimeError("x"), 1: refused})
    assert storage_cause(group) is refused
    # as a worker's failure reaches the driver: wrapped with its traceback text, pickled
    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    try:
        raise refused
    except OSError as e:
        carried = construct_user_exception_with_traceback(e)
    group = pickle.loads(pickle.dumps(ray.train.WorkerGroupError("failed", {0: carried})))
    assert str(storage_cause(group)) == str(refused)
    try:
        try:
            raise refused
        except OSError as e:
            raise RuntimeError("while writing the snapshot") from e
    except RuntimeError as wrapped:
        assert storage_cause(wrapped) is refused
    assert storage_cause(ray.train.ControllerError(ValueError("bad spec"))) is None
    # Ray keeps an actor's failure in __init__ as text only: its last error line is used
    from ray.exceptions import ActorDiedError

    died = ActorDiedError()
    died.error_msg = (
        "creation task failed\n  File x\nOSError: When testing for bucket: NETWORK_CONNECTION"
    )
    assert str(storage_cause(died)) == "When testing for bucket: NETWORK_CONNECTION"
    assert storage_cause(ActorDiedError()) is None


def test_a_long_error_keeps_the_end_of_its_traceback():
    text = "Traceback\n" + "  frame\n" * 2000 + "OSError: NETWORK_CONNECTION refused"
    record = error_record(RuntimeError(text))
    assert len(record["message"]) < 4100 and record["message"].endswith("refused")
    assert record["type"] == "RuntimeError" and "storage" not in record


def _store_with_checkpoints(tmp_path, epochs):
    from pyarrow.fs import LocalFileSystem

    from workers.checkpointing import checkpoint_name, upload_with_manifest

    fs, job = LocalFileSystem(), str(tmp_path / "acme" / "j1")
    src = tmp_path / "src"
    src.mkdir(parents=True)
    for e in epochs:
        (src / "state.pt").write_bytes(bytes([e]) * 100)
        name = checkpoint_name(e)
        upload_with_manifest(fs, src, f"{job}/checkpoints/{name}", name, e, 4 * e)
    (tmp_path / "acme/j1/checkpoints/checkpoint_manager_snapshot.json").write_text("{}")
    return fs, job


def test_a_restart_resumes_from_the_newest_listed_checkpoint_not_rays(tmp_path):
    from workers.checkpointing import resume_from

    fs, job = _store_with_checkpoints(tmp_path, [1, 2, 3])
    rays = ray.train.Checkpoint(path=f"{job}/checkpoints/epoch_00002", filesystem=fs)
    chosen = resume_from(fs, job, rays)
    assert chosen.path == f"{job}/checkpoints/epoch_00003"
    newest = ray.train.Checkpoint(path=f"{job}/checkpoints/epoch_00003", filesystem=fs)
    assert resume_from(fs, job, newest) is newest  # Ray's own when it is the newest listed
    empty = tmp_path / "none"
    assert resume_from(fs, str(empty), None) is None


def test_retiring_deletes_unlisted_folders_that_ray_does_not_track(tmp_path):
    from workers.artifacts import list_checkpoints
    from workers.checkpointing import retire_old_manifests
    from workers.storage import list_files

    fs, job = _store_with_checkpoints(tmp_path, [1, 2, 3, 4])
    folders = lambda: [i.path.rsplit("/", 1)[-1] for i in list_files(fs, f"{job}/checkpoints")]  # noqa: E731
    path = lambda e: f"{job}/checkpoints/epoch_{e:05d}"  # noqa: E731
    # Ray committed 2 and 4; 1 and 3 were listed but their workers died before Ray's commit
    assert retire_old_manifests(fs, job, 2, {path(2), path(4) + "/"}) == [
        "epoch_00001",
        "epoch_00002",
    ]
    assert [c.epoch for c in list_checkpoints(fs, job)] == [3, 4]
    # 1 is gone; 2 stays for Ray to delete (its snapshot names it); Ray's own file is untouched
    assert folders() == [
        "checkpoint_manager_snapshot.json",
        "epoch_00002",
        "epoch_00003",
        "epoch_00004",
    ]

    # if Ray's paths do not name the newest listed one, nothing but manifests is touched
    fs, job = _store_with_checkpoints(tmp_path / "b", [1, 2, 3])
    assert retire_old_manifests(fs, job, 1, {"elsewhere/epoch_00003"}) == [
        "epoch_00001",
        "epoch_00002",
    ]
    assert folders() == [
        "checkpoint_manager_snapshot.json",
        "epoch_00001",
        "epoch_00002",
        "epoch_00003",
    ]
