"""The pieces of a real deployment that need no cluster: run-config round trip through
Flower's own parsing, certificates, energy sources, the measured ClientApp path, the
recording Grid and the comparison of two result folders."""

from __future__ import annotations

import csv
import math
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.config import flatten_dict, fuse_dicts, get_project_config, parse_config_args
from flwr.supercore.task_identity import TaskIdentity

from clients.measure import (
    EnergySource,
    Meter,
    measure_enabled,
    parse_pmic_adc,
    probe_energy_source,
)
from clients.spec import expand_run_config, flatten, unflatten
from devices.errors import ConfigError, DataError
from sim import deploy
from sim.certs import make_credentials
from sim.compare import compare, format_table, write_comparison
from sim.config import load_config
from sim.recording import RecordingGrid
from sim.results import DEVICE_COLUMNS, ROUND_COLUMNS, write_csv

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.toml"))


# --- run config ----------------------------------------------------------------------

def _app_defaults() -> dict[str, Any]:
    return flatten_dict(get_project_config(REPO)["tool"]["flwr"]["app"]["config"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_experiment_reaches_the_apps_through_flwr_run_config(path: Path, tmp_path: Path
                                                             ) -> None:
    cfg = load_config(path)
    # What `tinyfleet deploy` passes to `flwr run --run-config FILE` ...
    file = tmp_path / "run-config.toml"
    file.write_bytes(tomli_w.dumps(deploy.run_config_overrides(cfg, tmp_path)).encode())
    overrides = parse_config_args([str(file)])  # ... parsed as flwr parses it,
    run_config = fuse_dicts(_app_defaults(), overrides)  # checked and fused as the SuperLink
    assert all(isinstance(v, bool | int | float | str) for v in run_config.values())
    expanded = expand_run_config(run_config)  # ... and read back by the apps.
    assert expanded["tinyfleet.out"] == str(tmp_path.resolve())
    doc = unflatten({k: v for k, v in expanded.items() if not k.startswith("tinyfleet.")})
    assert doc == dict(cfg.doc)
    assert unflatten(cfg.to_run_config()) == dict(cfg.doc)


def test_unknown_run_config_keys_are_refused_as_flower_does() -> None:
    with pytest.raises(ValueError, match="not present"):
        fuse_dicts(_app_defaults(), {"train.nonsense": 1})


def test_app_defaults_are_the_cluster_smoke_config() -> None:
    defaults = {k: v for k, v in _app_defaults().items() if not k.startswith("tinyfleet.")}
    cfg = load_config(REPO / "configs" / "cluster-smoke.toml")
    assert defaults == flatten(cfg.doc)
    assert expand_run_config(_app_defaults()) == _app_defaults()


def test_a_broken_experiment_key_names_itself() -> None:
    with pytest.raises(ConfigError, match="tinyfleet.experiment"):
        expand_run_config({"tinyfleet.experiment": "{not json"})
    with pytest.raises(ConfigError, match="JSON object"):
        expand_run_config({"tinyfleet.experiment": "[1, 2]"})


def test_staged_app_holds_the_sources_only(tmp_path: Path) -> None:
    app = deploy.stage_app(tmp_path / "tinyfleet")
    assert (app / "pyproject.toml").read_bytes() == (REPO / "pyproject.toml").read_bytes()
    assert (app / "clients" / "client_app.py").is_file()
    assert (app / "devices" / "profiles" / "rpi4.toml").is_file()
    assert not list(app.rglob("test_*.py")) and not list(app.rglob("__pycache__"))


def test_supernode_command_carries_the_node_config(tmp_path: Path) -> None:
    cmd = deploy.supernode_command("10.0.0.1:9091", 2, 3, "jetson-orin-nano",
                                   root_certificates=tmp_path / "ca.crt",
                                   private_key=tmp_path / "k", port=9100)
    node_config = cmd[cmd.index("--node-config") + 1]
    assert node_config == ('partition-id=2 num-partitions=3 device="jetson-orin-nano" '
                           "measure=true")
    assert "--insecure" not in cmd and "--root-certificates" in cmd
    assert "--insecure" in deploy.supernode_command("h:1", 0, 1)
    with pytest.raises(ConfigError, match="partition-id"):
        deploy.supernode_command("h:1", 3, 3)
    with pytest.raises(ConfigError, match="device"):
        deploy.supernode_command("h:1", 0, 3, 'x" measure=false')


# --- certificates --------------------------------------------------------------------

def test_certificates_verify_and_keys_load(tmp_path: Path) -> None:
    cred = make_credentials(tmp_path, hosts=["127.0.0.1", "localhost", "pi-lead.lan"],
                            nodes=["pi-1"])
    ca = x509.load_pem_x509_certificate(cred.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(cred.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "pi-lead.lan"]
    priv, pub = cred.node_keys["pi-1"]
    key = load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert oct(priv.stat().st_mode & 0o777) == "0o600"
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(pub)  # the form `flwr supernode register` accepts
    with pytest.raises(ConfigError, match="hosts"):
        make_credentials(tmp_path / "x", hosts=[])


def test_tls_handshake_needs_the_ca(tmp_path: Path) -> None:
    cred = make_credentials(tmp_path / "a")
    other = make_credentials(tmp_path / "b")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cred.server_cert, cred.server_key)
    import socket

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _ = sock.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    good = ssl.create_default_context(cafile=str(cred.ca_cert))
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            good.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"x")
    bad = ssl.create_default_context(cafile=str(other.ca_cert))
    with pytest.raises(ssl.SSLCertVerificationError), \
            socket.create_connection(("127.0.0.1", port)) as raw:
        bad.wrap_socket(raw, server_hostname="127.0.0.1")
    t.join(timeout=5)
    sock.close()


# --- measurements --------------------------------------------------------------------

_PMIC = """\
     3V7_WL_SW_A current(0)=0.00390372A
   VDD_CORE_A current(7)=2.00000000A
     3V7_WL_SW_V volt(8)=3.70000000V
   VDD_CORE_V volt(15)=0.80000000V
   EXT5V_V volt(24)=5.14466000V
"""


def test_pmic_output_is_summed_over_rails() -> None:
    assert parse_pmic_adc(_PMIC) == pytest.approx(0.00390372 * 3.7 + 2.0 * 0.8)
    with pytest.raises(ValueError, match="no rail"):
        parse_pmic_adc("EXT5V_V volt(24)=5.1V\n")


def _fake_orin(root: Path, milliwatts: float) -> None:
    hw = root / "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hw.mkdir(parents=True)
    for idx, label, mv, ma in ((1, "VDD_IN", 5000.0, milliwatts / 5.0),
                               (2, "VDD_CPU_GPU_CV", 5000.0, 100.0), (3, "NC", 0.0, 0.0)):
        (hw / f"in{idx}_label").write_text(label + "\n")
        (hw / f"in{idx}_input").write_text(f"{mv:.0f}\n")
        (hw / f"curr{idx}_input").write_text(f"{ma:.0f}\n")


def test_jetson_rails_are_found_and_integrated(tmp_path: Path) -> None:
    _fake_orin(tmp_path, 5000.0)  # VDD_IN: 5 V x 1 A = 5 W
    src = probe_energy_source(tmp_path, pmic_command=("no-such-vcgencmd",))
    assert src is not None and src.name == "jetson-ina3221:VDD_IN"
    assert src.read_w is not None and src.read_w() == pytest.approx(5.0)
    with Meter(src, interval_s=0.01) as m:
        time.sleep(0.2)
    assert m.energy_j == pytest.approx(5.0 * m.wall_s, rel=0.05)
    assert m.energy_source == "jetson-ina3221:VDD_IN"


def test_jetpack4_iio_rails(tmp_path: Path) -> None:
    dev = tmp_path / "bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    dev.mkdir(parents=True)
    for idx, label, mw in ((0, "POM_5V_IN", 3000), (1, "POM_5V_GPU", 500)):
        (dev / f"rail_name_{idx}").write_text(label)
        (dev / f"in_power{idx}_input").write_text(str(mw))
    src = probe_energy_source(tmp_path, pmic_command=("no-such-vcgencmd",))
    assert src is not None and src.name == "jetson-ina3221x:POM_5V_IN"
    assert src.read_w is not None and src.read_w() == pytest.approx(3.0)


def test_energy_counter_and_unknown(tmp_path: Path) -> None:
    zone = tmp_path / "class/powercap/intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text("1000000")
    (zone / "max_energy_range_uj").write_text("2000000")
    src = probe_energy_source(tmp_path, pmic_command=("no-such-vcgencmd",))
    assert src is not None and src.read_j is not None
    with Meter(src) as m:
        (zone / "energy_uj").write_text("500000")  # wrapped: +1.5 J
    assert m.energy_j == pytest.approx(1.5)
    assert probe_energy_source(tmp_path / "empty", pmic_command=("no-such",)) is None
    with Meter(None) as m:
        sum(range(1000))
    assert math.isnan(m.energy_j) and m.wall_s > 0 and m.peak_mem_bytes > 1_000_000
    assert m.energy_source == "unknown"
    assert isinstance(EnergySource("x"), EnergySource)


def test_measure_switch() -> None:
    assert measure_enabled({"measure": True}, {})
    assert not measure_enabled({"measure": False}, {"TINYFLEET_MEASURE": "1"})
    assert measure_enabled({}, {"TINYFLEET_MEASURE": "1"})
    assert not measure_enabled({}, {})


@pytest.fixture
def task_identity() -> Any:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_client_app_measures_on_real_devices_and_emulates_otherwise(task_identity: Any
                                                                    ) -> None:
    from clients.client_app import _spec, app, build_training_model

    rc = load_config(REPO / "configs" / "cluster-smoke.toml").to_run_config()
    model = build_training_model(_spec(rc))
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m1"
    out = {}
    for measure in (True, False):
        ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config=rc,
                      node_config={"partition-id": 1, "num-partitions": 3,
                                   "device": "rpi4", "measure": measure})
        reply = app(msg, ctx)
        assert not reply.has_error(), reply.error
        out[measure] = reply
    real, emu = out[True].content, out[False].content
    rm, em = real.metric_records["metrics"], emu.metric_records["metrics"]
    assert rm["measured"] == 1 and em["measured"] == 0
    assert set(em) <= set(rm)  # the same metric names, plus the app's start-up time
    assert rm["peak-mem-bytes"] > 10 * em["peak-mem-bytes"]  # a process, not a step
    assert rm["macs"] == em["macs"] and rm["num-examples"] == em["num-examples"]
    assert dict(real.config_records["device"]) == {
        "partition-id": 1, "profile": "rpi4", "device-class": "sbc",
        "energy-source": Meter().energy_source}
    assert "device" not in emu.config_records


# --- recording grid ------------------------------------------------------------------

class _FakeGrid:
    """Replies after ``delay_s`` with a reply stamped ``compute_s`` before it arrives."""

    def __init__(self, delay_s: float, compute_s: float) -> None:
        self.delay_s, self.compute_s = delay_s, compute_s
        self.sent: dict[str, tuple[float, Message]] = {}

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for i, m in enumerate(messages):
            mid = f"id{len(self.sent) + i}"
            m.metadata.__dict__["_message_id"] = mid
            self.sent[mid] = (time.time(), m)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        out = []
        for mid in ids:
            t, m = self.sent[mid]
            if time.time() - t >= self.delay_s:
                metrics = MetricRecord({"compute-s": self.compute_s, "measured": 1,
                                        "energy-j": math.nan, "peak-mem-bytes": 123})
                r = Message(RecordDict({"metrics": metrics, "device": ConfigRecord(
                    {"partition-id": 0, "profile": "rpi4", "device-class": "sbc"})}),
                    reply_to=m)
                out.append(r)
        return out


def test_recording_grid_times_messages_from_their_timestamps(task_identity: Any,
                                                             tmp_path: Path) -> None:
    grid = RecordingGrid(_FakeGrid(delay_s=0.3, compute_s=0.1), poll_s=0.02)  # type: ignore[arg-type]
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 2})}),
                  dst_node_id=5, message_type="train")
    replies = list(grid.send_and_receive([msg], timeout=5))
    assert len(replies) == 1
    (rec,) = grid.records
    assert rec.group_id == "2" and rec.partition_id == 0 and rec.device == "rpi4"
    assert rec.compute_s == 0.1
    assert 0.3 - 0.1 <= rec.comm_s <= 0.3 - 0.1 + 0.2  # round trip less compute
    assert rec.bytes_up > 0 and rec.bytes_down > 0
    assert math.isnan(rec.comm_energy_j)
    # A node that never answers becomes a timeout row.
    grid2 = RecordingGrid(_FakeGrid(delay_s=60, compute_s=0.1), poll_s=0.02)  # type: ignore[arg-type]
    msg2 = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=5, message_type="train")
    assert list(grid2.send_and_receive([msg2], timeout=0.1)) == []
    assert [r.status for r in grid2.records] == ["timeout"]


# --- compare -------------------------------------------------------------------------

def _folder(path: Path, source: str, compute: float, energy: Any) -> Path:
    rounds = [{"round": r, "accuracy": 0.1 * r, "loss": 1.0, "round_time_s": 2.0,
               "clock_s": 2.0 * r, "bytes_up": 100, "participants": 2, "source": source,
               "energy_j": energy} for r in range(3)]
    devices = [{"round": r, "message_type": "train", "device_id": d, "device_class": "sbc",
                "status": "ok", "compute_s": compute, "comm_s": 1.0, "energy_j": energy,
                "peak_mem_bytes": 1000, "bytes_up": 100, "source": source}
               for r in (1, 2) for d in (0, 1)]
    write_csv(path / "rounds.csv", rounds, ROUND_COLUMNS)
    write_csv(path / "devices.csv", devices, DEVICE_COLUMNS)
    return path


def test_compare_lines_up_two_folders(tmp_path: Path) -> None:
    a = _folder(tmp_path / "a", "emulated", 0.5, 2.0)
    b = _folder(tmp_path / "b", "measured", 1.5, "")
    rows = compare(a, b)
    by = {(r["section"], r["key"], r["metric"]): r for r in rows}
    assert by[("run", "source", "source")]["a"] == "emulated"
    c = by[("device_class", "sbc", "mean_compute_s")]
    assert (c["a"], c["b"], c["b_over_a"]) == (0.5, 1.5, 3.0)
    e = by[("device_class", "sbc", "mean_energy_j")]
    assert e["a"] == 2.0 and math.isnan(e["b"]) and math.isnan(e["b_over_a"])
    assert by[("round", "2", "accuracy")]["b_over_a"] == pytest.approx(1.0)
    text = format_table(rows)
    assert "mean_compute_s" in text and "measured" in text
    out = write_comparison(tmp_path / "c.csv", rows)
    with out.open() as f:
        got = {(r["section"], r["key"], r["metric"]): r for r in csv.DictReader(f)}
    assert got[("device_class", "sbc", "mean_energy_j")]["b"] == ""
    with pytest.raises(DataError, match="rounds.csv"):
        compare(tmp_path / "a", tmp_path / "missing")


# --- processes -----------------------------------------------------------------------

def test_stop_ends_the_process_and_everything_it_spawned(tmp_path: Path) -> None:
    # A parent that starts a child in a session of its own, as Flower starts SuperExec.
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
              "start_new_session=True); print(c.pid, flush=True); time.sleep(60)")
    proc = deploy.start("parent", [sys.executable, "-c", script], tmp_path, tmp_path)
    deadline = time.monotonic() + 30
    while not proc.output().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(proc.output().split()[0])
    assert deploy._exists(child)
    proc.stop(grace_s=5)
    assert not proc.alive and not deploy._exists(child)


def test_certs_command_keeps_loopback_names(tmp_path: Path) -> None:
    from sim.cli import main

    assert main(["certs", str(tmp_path), "--host", "10.1.2.3", "--node", "pi-1"]) == 0
    srv = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1",
                                                                            "10.1.2.3"]
    assert (tmp_path / "nodes" / "pi-1.pub").is_file()
