"""Run experiments on a real cluster with Flower's deployment engine (SuperLink, SuperNodes).

Nothing here re-implements Flower: these are the commands ``flower-superlink``,
``flower-supernode`` and ``flwr`` with the options a tinyfleet cluster needs, the settings
Flower keeps under ``FLWR_HOME`` (``config.toml`` with the SuperLink connection, installed
apps), and the processes that run them:

- a SuperLink serves TLS (certificates from ``sim.certs``) and, with node authentication,
  only lets in SuperNodes an operator registered (``flwr supernode register KEY.pub``);
- a SuperNode runs on a device with its node config ``partition-id``, ``num-partitions``,
  ``device`` (a profile name) and ``measure`` (real measurements, ``clients.measure``);
- ``submit`` stages the project as a Flower app (the repository's ``pyproject.toml`` with
  its ``[tool.flwr.app]`` and the packages), and ``flwr run`` sends it with the experiment
  as one run-config key (``clients.spec.EXPERIMENT_KEY``) and the results folder
  (``tinyfleet.out``), where the ServerApp writes the files of ``sim.recording``.

Everything works offline: runtime dependency installation is disabled (the devices have
tinyfleet's environment already), and no command reaches beyond the given addresses.
Processes start in their own session so that ``Proc.stop`` can end each with everything
it spawned (Flower starts SuperExec, ServerApp and ClientApp processes of its own).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from devices.errors import ConfigError, TinyFleetError

if TYPE_CHECKING:  # the process commands stay light: no torch on a SuperNode's start-up
    from sim.certs import Credentials
    from sim.config import ExperimentConfig

__all__ = [
    "CONNECTION",
    "Proc",
    "flwr_env",
    "free_port",
    "register_node",
    "run_config_overrides",
    "run_status",
    "stage_app",
    "start",
    "submit",
    "superlink_command",
    "supernode_command",
    "wait_for_run",
    "write_connection",
]

CONNECTION = "tinyfleet"
_REPO = Path(__file__).resolve().parent.parent
_PACKAGES = ("clients", "devices", "sim", "strategies")
_APP_SUFFIXES = (".py", ".toml", ".json", ".md")


def _bin(name: str) -> str:
    """The Flower executable next to this Python (the venv), else on ``PATH``."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise TinyFleetError(f"{name}: not found next to {sys.executable} or on PATH; "
                             "install flwr>=1.41 in this environment")
    return found


def flwr_env(flwr_home: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: its ``FLWR_HOME``, this venv first on PATH
    (Flower starts ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by
    name), and quiet Python."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_connection(
    flwr_home: str | Path,
    address: str,
    root_certificates: str | Path | None = None,
    insecure: bool = False,
    name: str = CONNECTION,
) -> Path:
    """Write ``FLWR_HOME/config.toml`` with one SuperLink connection, the default.

    ``flwr run``, ``flwr supernode register`` and ``flwr ls`` read it (flwr 1.42 keeps
    connections there, no longer in the app's ``pyproject.toml``).
    """
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]",
             f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    elif root_certificates is not None:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def superlink_command(
    port: int,
    credentials: Credentials | None,
    host: str = "127.0.0.1",
    node_auth: bool = True,
    database: str | Path | None = None,
) -> list[str]:
    """``flower-superlink`` serving every API on ``host:port``, over TLS unless
    ``credentials`` is None (then ``--insecure``), with SuperNode authentication."""
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if credentials is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(credentials.ca_cert),
                "--ssl-certfile", str(credentials.server_cert),
                "--ssl-keyfile", str(credentials.server_key)]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(
    superlink: str,
    partition_id: int,
    num_partitions: int,
    device: str = "",
    *,
    root_certificates: str | Path | None = None,
    private_key: str | Path | None = None,
    port: int = 9094,
    measure: bool = True,
    max_wait_s: float | None = None,
) -> list[str]:
    """``flower-supernode`` for one device (node config: partition, profile, measure).

    Without ``root_certificates`` it connects in plaintext (``--insecure``).
    """
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id: expected 0 <= id < num-partitions "
                          f"({num_partitions}), got {partition_id}")
    node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
    if device:
        if not device.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"device: expected a profile name, got {device!r}")
        node_config += f' device="{device}"'
    node_config += f" measure={'true' if measure else 'false'}"
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(port),
           "--node-config", node_config]
    if root_certificates is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(max_wait_s)]
    return cmd


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc`` (Linux); just ``pid`` elsewhere."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return [pid]
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


@dataclass
class Proc:
    """A Flower process tinyfleet started, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    _log_file: IO[bytes] | None = None

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.popen.poll() is None

    def output(self) -> str:
        """What the process wrote so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, text: str, timeout: float) -> bool:
        """Wait until ``text`` appears in the log; False on timeout or exit."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.output():
                return True
            if not self.alive:
                return text in self.output()
            time.sleep(0.2)
        return False

    def stop(self, grace_s: float = 5.0) -> None:
        """End the process and every process it started (SIGTERM, then SIGKILL)."""
        pids = _tree(self.popen.pid) if self.alive else []
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGTERM)
        end = time.monotonic() + grace_s
        while time.monotonic() < end and any(_exists(p) for p in pids):
            self.popen.poll()
            time.sleep(0.1)
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def start(name: str, cmd: Sequence[str], flwr_home: str | Path, log_dir: str | Path,
          extra_env: Mapping[str, str] | None = None) -> Proc:
    """Start ``cmd`` in its own session with ``FLWR_HOME``, logging to ``log_dir/NAME.log``."""
    log = Path(log_dir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    f = log.open("wb")
    popen = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=flwr_env(flwr_home, extra_env),
                             start_new_session=True, cwd=str(log.parent))
    return Proc(name, popen, log, f)


def _flwr(args: Sequence[str], flwr_home: str | Path, timeout: float = 120.0
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_bin("flwr"), *args], capture_output=True, text=True,
                          env=flwr_env(flwr_home), timeout=timeout, stdin=subprocess.DEVNULL)


def _json_out(res: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    text = res.stdout
    start_at = text.find("{")
    try:
        data = json.loads(text[start_at:]) if start_at >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    if res.returncode != 0 or not data.get("success", False):
        msg = data.get("error-message") or (res.stdout + res.stderr).strip()
        raise TinyFleetError(f"{what} failed: {msg}")
    return data


def register_node(flwr_home: str | Path, public_key: str | Path, name: str = "") -> int:
    """``flwr supernode register``: let the SuperNode with this public key join."""
    args = ["supernode", "register", str(public_key), CONNECTION, "--format", "json"]
    if name:
        args += ["--name", name]
    return int(_json_out(_flwr(args, flwr_home), "flwr supernode register")["node-id"])


def stage_app(dest: str | Path, repo: str | Path = _REPO) -> Path:
    """Copy the Flower app (``pyproject.toml`` and the packages' sources) to ``dest``.

    ``flwr run`` bundles a directory into a FAB; staging keeps the virtualenv, results
    and tests out of its walk. The apps are the repository's, byte for byte.
    """
    repo, dest = Path(repo), Path(dest)
    if not (repo / "pyproject.toml").is_file():
        raise TinyFleetError(f"{repo}: no pyproject.toml; deploying needs a source "
                             "checkout of tinyfleet")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(repo / "pyproject.toml", dest / "pyproject.toml")
    for pkg in _PACKAGES:
        for path in sorted((repo / pkg).rglob("*")):
            if (path.is_file() and path.suffix in _APP_SUFFIXES
                    and "__pycache__" not in path.parts and not path.name.startswith("test_")):
                target = dest / path.relative_to(repo)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return dest


def run_config_overrides(cfg: ExperimentConfig, out_dir: str | Path) -> dict[str, Any]:
    """The ``--run-config`` file's content: the experiment as one key, the results path."""
    from clients.spec import EXPERIMENT_KEY

    section, _, key = EXPERIMENT_KEY.partition(".")
    return {section: {key: json.dumps(dict(cfg.doc), sort_keys=True),
                      "out": str(Path(out_dir).resolve())}}


def submit(cfg: ExperimentConfig, out_dir: str | Path, flwr_home: str | Path) -> int:
    """``flwr run`` the staged app with ``cfg`` to the default connection; the run id."""
    import tomli_w

    home = Path(flwr_home)
    app = stage_app(home / "app" / "tinyfleet")
    overrides = home / "run-config.toml"
    overrides.write_bytes(tomli_w.dumps(run_config_overrides(cfg, out_dir)).encode())
    res = _flwr(["run", str(app), CONNECTION, "--run-config", str(overrides),
                 "--format", "json"], home)
    return int(_json_out(res, "flwr run")["run-id"])


def run_status(flwr_home: str | Path, run_id: int) -> str:
    """The run's status as ``flwr ls`` reports it (e.g. ``finished:completed``)."""
    res = _flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], flwr_home)
    runs = _json_out(res, "flwr ls").get("runs", [])
    return str(runs[0].get("status", "")) if runs else ""


def wait_for_run(flwr_home: str | Path, run_id: int, out_dir: str | Path,
                 timeout_s: float = 3600.0, status_every_s: float = 15.0) -> dict[str, Any]:
    """Wait until the run finished and its ``summary.json`` is written; the summary.

    Watches for the file (cheap) and asks the SuperLink for the run's status every
    ``status_every_s`` (each ``flwr ls`` is a Python process), so a failed run is
    reported without waiting for the timeout.

    Raises
    ------
    TinyFleetError
        When the run fails, stops, or is not done within ``timeout_s`` (with the run's
        log from ``flwr log``).
    """
    summary = Path(out_dir) / "summary.json"
    end = time.monotonic() + timeout_s
    status, asked = "", -math.inf
    while time.monotonic() < end:
        if summary.is_file() or time.monotonic() - asked >= status_every_s:
            status, asked = run_status(flwr_home, run_id), time.monotonic()
            if status.startswith("finished"):
                break
        time.sleep(0.5)
    if status == "finished:completed" and summary.is_file():
        data: dict[str, Any] = json.loads(summary.read_text())
        return data
    log = _flwr(["log", str(run_id), CONNECTION, "--show"], flwr_home, timeout=60)
    raise TinyFleetError(f"run {run_id}: status {status or 'unknown'!r}"
                         f"{'' if summary.is_file() else ', no summary.json'}; "
                         f"log:\n{(log.stdout + log.stderr)[-4000:]}")
