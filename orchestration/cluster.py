"""`asymflow cluster up|down`: a local Ray head on 127.0.0.1 (GCS, dashboard, job server), stopped by its own PIDs.

`ray stop` kills every Ray process of the machine, including other people's clusters, so `down` never calls it:
`up` gives the head a dedicated `--temp-dir`, records the PIDs of the processes whose command line names that
directory (GCS, raylet, dashboard, monitors) in a state file, and `down` terminates those plus all their
descendants (workers rename themselves `ray::IDLE`, job drivers run under the job supervisor), then any straggler
that still names the temp dir.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
STATE_FILE = "cluster.json"
NOAUTH_WARNING = (
    "warning: the Ray head will listen on {host}. Ray has no authentication beyond its cluster token "
    "(RAY_AUTH_MODE=token, ~/.ray/auth_token): anyone who can reach these ports and holds the token — or any "
    "port if token auth is turned off — can run arbitrary code on this machine. Expose it only on a trusted network."
)


# ----------------------------------------------------------------------------------------------- environment


def ray_env(host: str = "127.0.0.1") -> dict[str, str]:
    """Environment of every Ray process we start. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray binds its sockets to
    the node IP we give it (127.0.0.1) instead of the machine's reachable address; token auth stays on; the
    interpreter's bin directory goes first on PATH so job entrypoints (`python -m orchestration.cli ...`) find the
    same environment."""
    env = dict(os.environ)
    if host in LOOPBACK:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.setdefault("RAY_AUTH_MODE", "token")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_state_dir() -> Path:
    return Path(os.environ.get("ASYMFLOW_HOME", Path.home() / ".asymflow"))


def state_path(state_dir: str | os.PathLike | None) -> Path:
    return (Path(state_dir) if state_dir else default_state_dir()) / STATE_FILE


def read_state(state_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    path = state_path(state_dir)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _ensure_token(env: dict[str, str]) -> None:
    """Token auth needs a token before the head starts: if none exists where Ray looks ($RAY_AUTH_TOKEN,
    $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token), write a random one there, readable by the owner only. Never
    printed; clients on this machine find it at the same place."""
    if env.get("RAY_AUTH_MODE", "").lower() != "token" or env.get("RAY_AUTH_TOKEN"):
        return
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


# ----------------------------------------------------------------------------------------------- processes


def _processes_naming(text: str) -> list[Any]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in a for a in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def head_processes(state: dict[str, Any]) -> list[Any]:
    """Live processes of the head in `state`: recorded PIDs (checked against their start time, so a recycled PID
    is never touched), anything naming its temp dir, and all their descendants."""
    import psutil

    roots = {}
    for rec in state.get("pids", []):
        try:
            p = psutil.Process(rec["pid"])
            if abs(p.create_time() - rec["create_time"]) < 1.0:
                roots[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    for p in _processes_naming(state["temp_dir"]):
        roots.setdefault(p.pid, p)
    procs = dict(roots)
    for p in list(roots.values()):
        try:
            for child in p.children(recursive=True):
                procs.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    procs.pop(os.getpid(), None)
    return list(procs.values())


def terminate(procs: list[Any], grace_s: float = 10.0) -> list[int]:
    """SIGTERM, wait `grace_s`, SIGKILL what is left. Returns the PIDs that had to be killed."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


# ----------------------------------------------------------------------------------------------- up / down


def cluster_up(port: int | None = None, dashboard_port: int | None = None, host: str = "127.0.0.1",
               num_cpus: int | None = None, temp_dir: str | None = None, state_dir: str | None = None,
               timeout_s: float = 120.0) -> dict[str, Any]:
    """Start a Ray head and wait until its job server answers; write and return the state file's content."""
    path = state_path(state_dir)
    old = read_state(state_dir)
    if old is not None and head_processes(old):
        raise RuntimeError(f"a head started by asymflow is already running ({old['dashboard_url']}); "
                           f"`asymflow cluster down{' --state-dir ' + str(state_dir) if state_dir else ''}` first")
    env = ray_env(host)
    _ensure_token(env)
    bind = "127.0.0.1" if host in LOOPBACK else host
    port = port or free_port(bind)
    dashboard_port = dashboard_port or free_port(bind)
    # Short path: Ray's Unix sockets live under it and socket paths are limited to ~107 bytes.
    temp_dir = os.path.abspath(temp_dir or tempfile.mkdtemp(prefix="afray-", dir="/tmp"))
    # Every port Ray would otherwise take from a fixed default (client server 10001, agent 52365, ...) is chosen
    # free at run time, so several heads can share a machine.
    ports = {name: free_port(bind) for name in ("ray-client-server-port", "dashboard-agent-listen-port",
                                                "dashboard-agent-grpc-port", "metrics-export-port",
                                                "runtime-env-agent-port", "node-manager-port",
                                                "object-manager-port")}
    cmd = [shutil.which("ray", path=env["PATH"]) or "ray", "start", "--head", "--node-ip-address", bind,
           "--port", str(port), "--dashboard-host", bind, "--dashboard-port", str(dashboard_port),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    for name, value in ports.items():
        cmd += [f"--{name}", str(value)]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    # Processes of this head (job drivers, Ray Train's controller and its PlacementGroupCleaner, which queries the
    # state API without an address) resolve "auto" to this head, not to "multiple active Ray instances" when other
    # heads share the machine.
    env["RAY_ADDRESS"] = f"{bind}:{port}"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    state = {
        "gcs_address": f"{bind}:{port}",
        "dashboard_url": f"http://{bind}:{dashboard_port}",
        "host": bind,
        "temp_dir": temp_dir,
        "started": time.time(),
        "pids": [],
    }
    procs = _processes_naming(temp_dir)
    state["pids"] = [{"pid": p.pid, "create_time": p.create_time(), "name": p.name()} for p in procs]
    if proc.returncode != 0:
        terminate(head_processes(state))
        raise RuntimeError(f"ray start failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))
    _wait_for_job_server(state["dashboard_url"], timeout_s, env)
    return state


def _wait_for_job_server(url: str, timeout_s: float, env: dict[str, str]) -> None:
    """The dashboard comes up a moment after `ray start` returns; poll its (authenticated) job API."""
    from orchestration.job_client import connect

    deadline = time.time() + timeout_s
    while True:
        try:
            connect(url).list_jobs()
            return
        except Exception as exc:  # connection refused while the dashboard starts
            if time.time() > deadline:
                raise RuntimeError(f"the job server at {url} did not answer within {timeout_s:.0f}s: {exc}") from exc
            time.sleep(1.0)


def cluster_down(state_dir: str | None = None, grace_s: float = 10.0) -> list[int]:
    """Stop exactly the head recorded in the state file (and its workers and job drivers); remove its temp dir and
    the state file. Returns the PIDs stopped."""
    state = read_state(state_dir)
    if state is None:
        return []
    procs = head_processes(state)
    pids = [p.pid for p in procs]
    terminate(procs, grace_s)
    # Processes spawned while we waited (a worker the raylet was starting) are caught by a second sweep.
    leftover = head_processes(state)
    if leftover:
        pids += [p.pid for p in leftover]
        terminate(leftover, 2.0)
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    state_path(state_dir).unlink(missing_ok=True)
    return pids


# ----------------------------------------------------------------------------------------------- CLI


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    cluster = sub.add_parser("cluster", help="start/stop a local Ray head (dashboard + job server) on 127.0.0.1")
    csub = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    up = csub.add_parser("up", help="start a Ray head; prints the job address for `asymflow submit --address`")
    up.add_argument("--port", type=int, help="GCS port [free port]")
    up.add_argument("--dashboard-port", type=int, help="dashboard / job server port [free port]")
    up.add_argument("--host", default="127.0.0.1",
                    help="address to bind [127.0.0.1]; anything else exposes an unauthenticated-by-default Ray")
    up.add_argument("--num-cpus", type=int, help="logical CPUs the head offers [all cores]")
    up.add_argument("--temp-dir", help="Ray's temp/session root for this head [a fresh /tmp/afray-*]")
    up.add_argument("--state-dir", help=f"where {STATE_FILE} is kept [$ASYMFLOW_HOME or ~/.asymflow]")
    up.set_defaults(func=_run_up)
    down = csub.add_parser("down", help="stop the head started by `cluster up` (only its processes)")
    down.add_argument("--state-dir", help=f"where {STATE_FILE} is kept [$ASYMFLOW_HOME or ~/.asymflow]")
    down.set_defaults(func=_run_down)


def _run_up(args: argparse.Namespace) -> int:
    for flag, value, low, high in (("--port", args.port, 1, 65535), ("--dashboard-port", args.dashboard_port, 1, 65535),
                                   ("--num-cpus", args.num_cpus, 1, None)):
        if value is not None and (value < low or (high is not None and value > high)):
            raise ValueError(f"{flag} {value}: must be in [{low}, {high or '∞'}]")
    if args.host not in LOOPBACK:
        print(NOAUTH_WARNING.format(host=args.host), file=sys.stderr)
    try:
        state = cluster_up(args.port, args.dashboard_port, args.host, args.num_cpus, args.temp_dir, args.state_dir)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ray head up: gcs {state['gcs_address']}, {len(state['pids'])} processes, temp dir {state['temp_dir']}")
    print(f"dashboard and job server: {state['dashboard_url']}")
    print(f"submit with: asymflow submit CONFIG --address {state['dashboard_url']}")
    print(f"address={state['dashboard_url']}")
    return 0


def _run_down(args: argparse.Namespace) -> int:
    if read_state(args.state_dir) is None:
        print(f"no head recorded in {state_path(args.state_dir)}; nothing to stop")
        return 0
    pids = cluster_down(args.state_dir)
    print(f"ray head down: stopped {len(pids)} processes")
    return 0
