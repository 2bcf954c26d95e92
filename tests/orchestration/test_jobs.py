"""Job lifecycle: ledger and submission ids (unit, no Ray); a real `asymflow cluster up` head with token auth,
`asymflow submit` of tiny runs (prep + train), idempotent resubmission, a crashed driver resumed, a graceful stop
resumed, `list`, and `cluster down` leaving no process behind (integration).

The integration tests share one head and run in order; every CLI call is a subprocess with the environment a user
would have (loopback Ray, an isolated token file, an isolated state directory).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from orchestration.ledger import Ledger, parse_lines, parse_submission_id, redact_overrides, run_slug, submission_id

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- unit: ids, ledger


def test_submission_id_is_derived_from_run_and_attempt():
    assert submission_id("tiny", 3) == "asymflow-tiny-3"
    assert submission_id("my run/v2", 1) == "asymflow-my-run-v2-1"
    assert parse_submission_id("asymflow-tiny-3") == ("tiny", 3)
    assert parse_submission_id("asymflow-tiny-3", "tiny") == ("tiny", 3)
    # Another run whose name extends this one, and helper jobs, are not this run's attempts.
    assert parse_submission_id("asymflow-tiny-x-3", "tiny") is None
    assert parse_submission_id("asymflow-tiny-1-sigterm-17", "tiny") is None
    assert parse_submission_id("raysubmit_abc") is None
    with pytest.raises(ValueError):
        submission_id("tiny", 0)
    with pytest.raises(ValueError):
        run_slug("///")


def test_ledger_appends_reads_and_tolerates_a_torn_last_line(tmp_path):
    ledger = Ledger.for_run(str(tmp_path), "r")
    assert ledger.read() == [] and ledger.next_attempt() == 1 and ledger.last_submission() is None
    ledger.append("submit", submission_id="asymflow-r-1", attempt=1, address="http://127.0.0.1:1")
    ledger.append("state", submission_id="asymflow-r-1", state="RUNNING")
    ledger.append("checkpoint", step=4, wandb_run_id="r-123")
    path = Path(ledger.path)
    with open(path, "ab") as f:  # a writer killed mid-line
        f.write(b'{"kind": "state", "submission_id": "asymflow-r-1", "sta')
    assert [e["kind"] for e in ledger.read()] == ["submit", "state", "checkpoint"]
    # The next append starts on a fresh line, so the torn fragment never swallows a good event.
    ledger.append("state", submission_id="asymflow-r-1", state="FAILED")
    assert ledger.last_state("asymflow-r-1") == "FAILED"
    ledger.append("submit", submission_id="asymflow-r-2", attempt=2, address="http://127.0.0.1:1")
    assert ledger.next_attempt() == 3 and ledger.last_submission()["submission_id"] == "asymflow-r-2"
    summary = ledger.summary()
    assert summary["attempts"] == 2 and summary["checkpoint_steps"] == [4] and summary["wandb_run_id"] == "r-123"
    assert summary["state"] is None  # attempt 2 has no state yet
    assert parse_lines(b'{"a": 1}\n\n[1, 2]\n{"b"') == [{"a": 1}]


def test_ledger_never_writes_secrets(tmp_path):
    ledger = Ledger.for_run(str(tmp_path), "r")
    ledger.append("submit", args={"overrides": ["train.lr=1e-4", "log.wandb_api_key=abc123", "x.auth_token=zzz"]},
                  RAY_AUTH_TOKEN="zzz", env={"password": "hunter2", "ok": "fine"})
    text = Path(ledger.path).read_text()
    for secret in ("abc123", "zzz", "hunter2"):
        assert secret not in text
    assert "train.lr=1e-4" in text and "fine" in text
    assert redact_overrides(["a.token=1", "b=2", "flag"]) == ["a.token=<redacted>", "b=2", "flag"]


def test_entrypoint_and_runtime_env(tmp_path):
    from orchestration.jobs import SubmitArgs, build_entrypoint, build_runtime_env

    a = SubmitArgs(config=str(REPO / "configs" / "tiny.yaml"), steps=5, workers=2, overrides=["train.lr=1e-4"],
                   prep=str(tmp_path / "images dir"), prep_resolution=64)
    cmd = build_entrypoint(a, "r", "/st", "/data x")
    assert "python -m orchestration.cli train configs/tiny.yaml --data '/data x' --storage /st --name r " \
           "--address auto --steps 5 --workers 2 --set train.lr=1e-4" in cmd
    assert cmd.startswith("{ test -e '/data x/subspace.safetensors' || { python -m orchestration.cli prep shards")
    assert "--resolution 64" in cmd and "prep cache '/data x' --config configs/tiny.yaml" in cmd
    env = build_runtime_env(a)
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"] and ".git" in env["excludes"]
    assert env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "300"
    assert not any("TOKEN" in k for k in env["env_vars"])
    installed = SubmitArgs(config="/elsewhere/c.yaml", working_dir=None)
    assert "working_dir" not in build_runtime_env(installed)
    assert " train /elsewhere/c.yaml " in build_entrypoint(installed, "r", "/st", "/d")


def test_user_environment_wins_over_our_defaults(tmp_path, monkeypatch):
    """The user's WANDB_MODE / HF_HUB_OFFLINE reach the job (nothing secret does); RAY_ADDRESS names the job server;
    a config that leaves log.wandb_mode unset lets wandb itself read $WANDB_MODE."""
    import wandb

    from orchestration.config import load_config
    from orchestration.jobs import SubmitArgs, build_runtime_env, default_address

    a = SubmitArgs(config="c.yaml", forward_env={"WANDB_MODE": "online", "HF_HUB_OFFLINE": "0", "WANDB_API_KEY": "k"})
    env = build_runtime_env(a)["env_vars"]
    assert env["WANDB_MODE"] == "online" and env["HF_HUB_OFFLINE"] == "0" and "WANDB_API_KEY" not in env
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9999")
    assert default_address() == "http://127.0.0.1:9999"

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), ["log.wandb_tags=[a, b]", "log.wandb_group=g"])
    kwargs = cfg.log.wandb_init_kwargs(cfg.run.name)
    assert kwargs["mode"] is None and kwargs["name"] == "tiny" and kwargs["tags"] == ["a", "b"]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = wandb.init(dir=str(tmp_path), **kwargs)
    try:
        assert run.disabled  # the environment decided, not a mode we passed
    finally:
        run.finish()


def test_progress_from_logs():
    from orchestration.jobs import progress_from_logs

    logs = ("(RayTrainWorker pid=1) [asymflow] resumed from /r/checkpoints/step-00000004 (step 4, saved by 2 "
            "worker(s))\n"
            "(RayTrainWorker pid=1) [asymflow] step 5/8 loss 1.0 gn 2 lr 0.001 3.5 samples/s data-wait 1% skipped 0 "
            "eta 0.5 min\n(RayTrainWorker pid=1) [asymflow] preempted: checkpoint at step 6 committed; exiting\n")
    facts = progress_from_logs(logs)
    assert facts == {"step": 5, "total": 8, "samples_per_s": 3.5, "eta_s": 30.0, "resumed_from": [4],
                     "preempted_at": [6]}


def test_non_loopback_host_warns(monkeypatch, capsys):
    from orchestration import cluster

    monkeypatch.setattr(cluster, "cluster_up", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not started")))
    parser_args = type("A", (), {"host": "0.0.0.0", "port": None, "dashboard_port": None, "num_cpus": None,
                                 "temp_dir": None, "state_dir": None})()
    assert cluster._run_up(parser_args) == 1
    err = capsys.readouterr().err
    assert "no authentication" in err and "trusted network" in err


# ----------------------------------------------------------------------------------------------- integration

STEPS_A = 4
STEPS_B = 30
TOKEN = "asymflow-test-token-0123456789abcdef"


def _cli_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="offline",
               RAY_AUTH_TOKEN_PATH=str(home / "auth_token"), ASYMFLOW_HOME=str(home), PYTHONUNBUFFERED="1")
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    return env


class Cli:
    """`python -m orchestration.cli ...` in a subprocess; remembers every output to check no token leaks."""

    def __init__(self, env: dict[str, str], storage: Path):
        self.env, self.storage = env, storage
        self.outputs: list[str] = []

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "orchestration.cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        self.outputs.append(proc.stdout + proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"asymflow {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def status(self, run: str) -> dict:
        return json.loads(self("status", run, "--storage", str(self.storage), "--json").stdout)

    def logs(self, run: str, *extra: str) -> str:
        return self("logs", run, "--storage", str(self.storage), *extra).stdout

    def wait(self, run: str, until, timeout: float = 420, every: float = 3.0) -> dict:
        deadline = time.time() + timeout
        while True:
            info = self.status(run)
            if until(info):
                return info
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting on {run}: {info}\n{self.logs(run)[-3000:]}")
            time.sleep(every)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("asymflow-home")
    (home / "auth_token").write_text(TOKEN)
    os.chmod(home / "auth_token", 0o600)
    cli = Cli(_cli_env(home), home / "runs")
    out = cli("cluster", "up", "--num-cpus", "4").stdout
    address = re.search(r"^address=(\S+)$", out, re.M).group(1)
    state = json.loads((home / "cluster.json").read_text())
    yield {"cli": cli, "address": address, "home": home, "state": state}
    cli("cluster", "down", check=False)  # no-op once test_cluster_down_leaves_nothing ran


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    from data_prep.corpus import build_clean_corpus

    root = tmp_path_factory.mktemp("images")
    build_clean_corpus(root)
    return str(root)


def _jobs_of(address: str, env: dict[str, str], run: str) -> list[str]:
    code = ("import json, sys; from orchestration.jobs import connect, run_jobs_on_cluster; "
            f"print(json.dumps(sorted(run_jobs_on_cluster(connect({address!r}), {run!r}))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_head_binds_loopback_and_requires_the_token(head):
    import psutil

    pids = {p["pid"] for p in head["state"]["pids"]}
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "no listening socket found for the head's processes"
    assert all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), listening
    code = ("from orchestration.jobs import connect\n"
            "try:\n    connect(%r).list_jobs()\nexcept Exception as e:\n    print(type(e).__name__)\n"
            "else:\n    print('accepted')\n") % head["address"]
    env = {**head["cli"].env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong-token"}
    env.pop("RAY_AUTH_TOKEN_PATH")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "AuthenticationError"


@pytest.mark.integration
def test_submit_with_prep_succeeds_and_resubmitting_a_finished_run_does_nothing(head, images, tmp_path_factory):
    cli, address = head["cli"], head["address"]
    data = str(tmp_path_factory.mktemp("data") / "tiny64")
    head["data"] = data
    out = cli("submit", "configs/tiny.yaml", "--address", address, "--name", "a", "--storage", str(cli.storage),
              "--data", data, "--prep", images, "--prep-resolution", "64", "--steps", str(STEPS_A)).stdout
    assert "submitted asymflow-a-1" in out
    info = cli.wait("a", lambda i: i["state"] not in ("PENDING", "RUNNING"))
    assert info["state"] == "SUCCEEDED", cli.logs("a")[-3000:]
    assert info["step"] == STEPS_A and info["last_checkpoint"] == STEPS_A and info["samples_per_s"] > 0
    logs = cli.logs("a")
    assert "subspace (procrustes" in logs and f"step {STEPS_A}/{STEPS_A}" in logs
    assert "starting from the pretrained init" in logs
    again = cli("submit", "configs/tiny.yaml", "--name", "a", "--storage", str(cli.storage), "--data", data,
                "--steps", str(STEPS_A)).stdout  # the address comes from the ledger
    assert "already succeeded as job asymflow-a-1" in again
    assert _jobs_of(address, cli.env, "a") == ["asymflow-a-1"]


def _submit_b(cli: Cli, data: str, *extra: str) -> str:
    return cli("submit", "configs/tiny.yaml", "--name", "b", "--storage", str(cli.storage), "--data", data, *extra,
               "--steps", str(STEPS_B)).stdout  # the address comes from the ledger after attempt 1


@pytest.mark.integration
def test_live_run_is_not_duplicated_crash_resumes_stop_checkpoints_and_resumes(head):
    cli, address, data = head["cli"], head["address"], head["data"]
    run_dir = cli.storage / "b"

    # 1. Submit; resubmitting while it is live starts nothing.
    assert "submitted asymflow-b-1" in _submit_b(cli, data, "--address", address)
    assert "already live as job asymflow-b-1" in _submit_b(cli, data)
    assert _jobs_of(address, cli.env, "b") == ["asymflow-b-1"]

    # 2. Crash: SIGKILL the driver once a checkpoint exists; the job fails.
    cli.wait("b", lambda i: (i["last_checkpoint"] or 0) >= 2 and i["state"] == "RUNNING", every=2.0)
    code = ("from orchestration.jobs import connect; "
            f"print(connect({address!r}).get_job_info('asymflow-b-1').driver_info.pid)")
    pid = int(subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli.env, capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1])
    os.kill(pid, signal.SIGKILL)
    info = cli.wait("b", lambda i: i["state"] not in ("PENDING", "RUNNING"), every=1.0)
    assert info["state"] == "FAILED"
    crashed_at = info["last_checkpoint"]
    assert 0 < crashed_at < STEPS_B

    # 3. Resubmit: attempt 2 resumes from the latest complete checkpoint.
    out = _submit_b(cli, data)
    assert f"submitted asymflow-b-2 (run b, attempt 2; resumes from checkpoint step {crashed_at})" in out
    info = cli.wait("b", lambda i: i.get("resumed_from") and (i["step"] or 0) > i["resumed_from"][-1] + 1,
                    every=2.0)
    assert info["resumed_from"][-1] == crashed_at
    assert f"resumed from {run_dir}/checkpoints/step-{crashed_at:08d}" in cli.logs("b")

    # 4. Graceful stop under load (a CPU burner on this 2-core box): the stop marker is seen by every rank at the
    #    next step boundary, they checkpoint and end without a Ray Train restart; `stop` waits for the job to end and
    #    names the step of that checkpoint (not a log line).
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = cli("stop", "b", "--storage", str(cli.storage), "--timeout", "240").stdout
    finally:
        burner.kill()
        burner.wait()
    stopped_at = _assert_stopped(cli, run_dir, out, after=crashed_at, source="asymflow stop")

    # 5. Resubmit: attempt 3 resumes from the stop checkpoint; stock `ray job stop` is as graceful (the driver turns
    #    its SIGTERM into the same stop request).
    assert f"resumes from checkpoint step {stopped_at}" in _submit_b(cli, data)
    cli.wait("b", lambda i: i["state"] == "RUNNING" and (i["step"] or 0) > stopped_at + 1, every=1.0)
    stock = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "stop", "--address", address,
                            "asymflow-b-3"], cwd=REPO, env={**cli.env, "RAY_AUTH_MODE": "token"},
                           capture_output=True, text=True, timeout=300)
    assert stock.returncode == 0, stock.stdout + stock.stderr
    info = cli.wait("b", lambda i: i["state"] not in ("PENDING", "RUNNING"), every=1.0)
    stopped_again = _assert_stopped(cli, run_dir, None, after=stopped_at, source="SIGTERM to the driver")
    assert "SIGTERM: the workers checkpoint at the next step and stop" in cli.logs("b")

    # 6. Resubmit: attempt 4 resumes from the second stop and finishes.
    assert f"resumes from checkpoint step {stopped_again}" in _submit_b(cli, data)
    info = cli.wait("b", lambda i: i["state"] not in ("PENDING", "RUNNING"))
    assert info["state"] == "SUCCEEDED", cli.logs("b")[-3000:]
    assert info["last_checkpoint"] == STEPS_B and info["resumed_from"][0] == stopped_again
    if len(set(info["resumed_from"])) > 1:  # the worker group restarted inside attempt 4 (training side)
        logs = cli.logs("b")
        at = logs.find(f"(step {sorted(set(info['resumed_from']))[1]},")
        warnings.warn(f"attempt 4 resumed more than once {info['resumed_from']}:\n{logs[max(0, at - 4000):at + 300]}")
    # One line per event, once, and the libraries' known noise filtered at the source.
    logs = cli.logs("b")
    step_lines = re.findall(r"\[asymflow\] step (\d+)/30 ", logs)
    assert step_lines and len(step_lines) == len(set(step_lines)), step_lines
    assert "FutureWarning" not in logs and "TrainingReport(" not in logs and "Setting accelerator to CPU" not in logs
    attempts = ["asymflow-b-1", "asymflow-b-2", "asymflow-b-3", "asymflow-b-4"]
    assert _jobs_of(address, cli.env, "b") == attempts
    assert not [j for j in _all_job_ids(address, cli.env) if "sigterm" in j]  # no helper jobs left by `stop`
    assert "resumed from" not in cli.logs("b", "--attempt", "1")

    # The ledger tells the story without the head.
    events = Ledger.for_run(str(cli.storage), "b").read()
    subs = [e for e in events if e["kind"] == "submit"]
    assert [e["submission_id"] for e in subs] == attempts
    assert [e["resume_from_step"] for e in subs] == [None, crashed_at, stopped_at, stopped_again]
    final = {e["submission_id"]: e["state"] for e in events if e["kind"] == "state"}
    assert final == {"asymflow-b-1": "FAILED", "asymflow-b-2": "STOPPED", "asymflow-b-3": "STOPPED",
                     "asymflow-b-4": "SUCCEEDED"}
    assert any(e["kind"] == "checkpoint" and e.get("wandb_run_id") for e in events)


def _assert_stopped(cli: Cli, run_dir: Path, out: str | None, after: int, source: str) -> int:
    """The run's last job ended STOPPED on a stop checkpoint: the workers' `stopped` ledger event names the step,
    that checkpoint is complete and marked stopped, nothing trained past it, and no stop marker is left."""
    events = [e for e in Ledger.for_run(str(cli.storage), "b").read() if e["kind"] == "stopped"]
    assert events and events[-1]["source"] == source, events
    step = int(events[-1]["step"])
    if out is not None:
        assert f"checkpoint at step {step} committed" in out, out
        assert f"resume from step {step}" in out, out
    assert after < step < STEPS_B
    state = json.loads((run_dir / "checkpoints" / f"step-{step:08d}" / "state.json").read_text())
    assert state["preempted"] is True and state["stopped"] is True and state["step"] == step
    info = cli.status("b")
    assert info["state"] == "STOPPED" and info["last_checkpoint"] == step, info
    assert not (run_dir / "STOP").exists()
    # Ended, not restarted: the last attempt's log stops once, at that step, and resumes nothing after it.
    logs = cli.logs("b")
    assert set(re.findall(r"\[asymflow\] stopped: checkpoint at step (\d+)", logs)) == {str(step)}, logs[-3000:]
    assert "resumed from" not in logs.split("[asymflow] stopped: checkpoint at step", 1)[1]
    return step


def _all_job_ids(address: str, env: dict[str, str]) -> list[str]:
    code = ("import json; from orchestration.jobs import connect; "
            f"print(json.dumps([j.submission_id or '' for j in connect({address!r}).list_jobs()]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_list_shows_runs_and_no_output_contains_the_token(head):
    cli = head["cli"]
    rows = json.loads(cli("list", "--storage", str(cli.storage), "--address", head["address"], "--json").stdout)
    by_run = {r["run"]: r for r in rows}
    assert by_run["a"]["state"] == "SUCCEEDED" and by_run["a"]["last_checkpoint"] == STEPS_A
    assert by_run["b"]["state"] == "SUCCEEDED" and by_run["b"]["submission_id"] == "asymflow-b-4"
    table = cli("list", "--storage", str(cli.storage)).stdout
    assert re.search(r"^b\s+asymflow-b-4\s+SUCCEEDED\s+30/30\s+30\b", table, re.M), table
    assert not any(TOKEN in o for o in cli.outputs)
    for ledger in cli.storage.glob("*/ledger.jsonl"):
        assert TOKEN not in ledger.read_text()


@pytest.mark.integration
def test_cluster_down_leaves_nothing(head):
    import psutil

    from orchestration.cluster import head_processes

    state = head["state"]
    assert head_processes(state)
    out = head["cli"]("cluster", "down").stdout
    assert "ray head down" in out
    assert head_processes(state) == []
    for rec in state["pids"]:
        assert not psutil.pid_exists(rec["pid"]) or psutil.Process(rec["pid"]).create_time() != rec["create_time"]
    assert not (head["home"] / "cluster.json").exists() and not Path(state["temp_dir"]).exists()


def test_read_progress_takes_last_complete_metrics_line(tmp_path):
    from orchestration.jobs import read_progress

    assert read_progress(str(tmp_path)) is None
    lines = [
        {"step": 1, "total_steps": 10, "samples_per_s": 2.0, "eta_s": 90.0, "time": 1.0},
        {"step": 2, "total_steps": 10, "samples_per_s": 4.0, "eta_s": 40.0, "time": 2.0},
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "tot'  # torn line being appended
    (tmp_path / "metrics.jsonl").write_text(text)
    assert read_progress(str(tmp_path)) == {"step": 2, "total": 10, "samples_per_s": 4.0, "eta_s": 40.0, "time": 2.0}
