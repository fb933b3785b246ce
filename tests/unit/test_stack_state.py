"""The local stack's state files cannot be turned against their user: `stack down` never signals a process that
merely reuses a recorded pid, and `stack env` / the env-file loader never run what the files hold.

Real processes and a real bash; no server is started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rigface.stack import LocalStack, StackInfo, apply_stack_env, format_env, process_start_time, read_env_file

REPO = Path(__file__).resolve().parents[2]
NASTY = [
    "$(touch PWNED_dollar)",
    "`touch PWNED_backtick`",
    "a'b\"c; touch PWNED_semicolon",
    "line1\nline2 $(touch PWNED_newline)",
    "${HOME}$PATH \\ back\\slash && touch PWNED_and",
    "",
]


def _sleeper() -> subprocess.Popen:
    # Its own session, like the servers `up` starts, so a wrong `down` would be able to signal its group.
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)


def _write_state(state: Path, pid: int, start: int) -> None:
    state.mkdir(parents=True, exist_ok=True)
    info = StackInfo(state_dir=str(state), bucket="rigface", ports={"s3": 9, "mlflow": 10},
                     pids={"s3": pid, "mlflow": pid}, starts={"s3": start, "mlflow": start})
    (state / "stack.json").write_text(json.dumps(info.__dict__))


def test_down_leaves_a_process_that_reuses_a_recorded_pid_alone(tmp_path):
    other = _sleeper()
    try:
        start = process_start_time(other.pid)
        assert start is not None
        # The state says "our server is this pid", but the start time recorded at `up` is another process's.
        _write_state(tmp_path / "state", other.pid, start - 1)
        stack = LocalStack(tmp_path / "state")
        assert stack.down() == []
        time.sleep(0.3)
        assert other.poll() is None, "down() killed an unrelated process that reused the pid"
        assert not stack.status()["running"]

        # The same file with the true start time does name our process: then down() stops it (the check can fail).
        _write_state(tmp_path / "state", other.pid, start)
        assert stack.down() == [other.pid]
        other.wait(timeout=20)
        assert other.returncode is not None
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()


def test_down_with_a_file_from_before_start_times_kills_nothing(tmp_path):
    other = _sleeper()
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / "stack.json").write_text(json.dumps({"state_dir": str(state), "bucket": "rigface",
                                                      "ports": {"s3": 9}, "pids": {"s3": other.pid}}))
        assert LocalStack(state).down() == []
        time.sleep(0.3)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def _crafted_state(state: Path) -> dict[str, str]:
    state.mkdir(parents=True, exist_ok=True)
    _write_state(state, 0, 0)
    creds = {"access_key": NASTY[0], "secret_key": NASTY[1], "mlflow_username": NASTY[2],
             "mlflow_password": NASTY[3], "mlflow_flask_secret": "x" * 20, "weed_jwt_signing": "x",
             "weed_jwt_filer_signing": "x", "weed_jwt_filer_read": "x", "weed_admin_password": NASTY[4]}
    (state / "credentials.json").write_text(json.dumps(creds))
    return creds


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_stack_env_on_crafted_state_is_inert_in_bash(tmp_path):
    creds = _crafted_state(tmp_path / "state")
    out = subprocess.run(
        [sys.executable, "-m", "rigface.cli", "--set", f"storage.state_dir={tmp_path / 'state'}", "stack", "env"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    work = tmp_path / "shell"
    work.mkdir()
    # eval the text the way the README says, then print each value NUL-separated to compare byte for byte.
    script = out.stdout + '\nprintf "%s\\0" "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" ' \
                          '"$MLFLOW_TRACKING_USERNAME" "$MLFLOW_TRACKING_PASSWORD" "$AWS_ENDPOINT_URL"\n'
    res = subprocess.run(["bash", "-c", 'eval "$(cat)"'], input=script, capture_output=True, text=True, cwd=work,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert list(work.iterdir()) == [], "evaluating `rigface stack env` ran a command"
    values = res.stdout.split("\0")[:5]
    assert values == [creds["access_key"], creds["secret_key"], creds["mlflow_username"],
                      creds["mlflow_password"], "http://127.0.0.1:9"]


def test_stack_env_refuses_a_state_file_with_non_numeric_ports(tmp_path):
    state = tmp_path / "state"
    _crafted_state(state)
    data = json.loads((state / "stack.json").read_text())
    data["ports"]["s3"] = "9$(touch PWNED)"
    (state / "stack.json").write_text(json.dumps(data))
    out = subprocess.run(
        [sys.executable, "-m", "rigface.cli", "--set", f"storage.state_dir={state}", "stack", "env"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert out.returncode == 1 and "PWNED" not in out.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_env_file_round_trips_through_the_parser_and_bash(tmp_path):
    env = {f"K{i}": v for i, v in enumerate(NASTY)}
    path = tmp_path / "stack.env"
    path.write_text(format_env(env))
    assert read_env_file(path) == env
    res = subprocess.run(["bash", "-c", f"set -a; . {path}; " + "; ".join(f'printf "%s\\0" "$K{i}"'
                                                                          for i in range(len(NASTY)))],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\0")[: len(NASTY)] == NASTY
    assert not list(tmp_path.glob("PWNED*"))


def test_env_file_loader_parses_and_never_executes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RIGFACE_STACK_ENV", raising=False)
    state = tmp_path / "state"
    state.mkdir()
    # A hand-written (or planted) file with unquoted shell: the loader reads words, it runs nothing.
    (state / "stack.env").write_text(
        "AWS_ENDPOINT_URL=http://127.0.0.1:1\n"
        "AWS_ACCESS_KEY_ID=$(touch PWNED_loader)\n"
        "export AWS_SECRET_ACCESS_KEY='`touch PWNED_tick`'\n"
        "MLFLOW_TRACKING_URI=http://127.0.0.1:2 # a comment\n"
        "1BAD=x\n"
        "touch PWNED_bare\n"
    )
    environ: dict[str, str] = {}
    assert apply_stack_env(state, environ)
    assert environ["AWS_ACCESS_KEY_ID"] == "$(touch"
    assert environ["AWS_SECRET_ACCESS_KEY"] == "`touch PWNED_tick`"
    assert environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:2"
    assert "1BAD" not in environ
    assert not list(tmp_path.rglob("PWNED*"))
    (state / "stack.env").write_text("AWS_ENDPOINT_URL='unterminated\n")
    assert read_env_file(state / "stack.env") == {}


def test_format_env_refuses_a_bad_name():
    from rigface.stack import StackError

    with pytest.raises(StackError):
        format_env({"A;touch x": "v"})
