"""``tinyfleet`` commands for a real cluster: certs, superlink, register, supernode, deploy,
compare (see docs/cluster.md). ``sim.cli`` adds them with ``add_commands`` and hands
their parsed arguments to ``run_command``.

Each command is a thin layer over ``sim.deploy`` / ``sim.certs`` / ``sim.compare``: the
processes are Flower's own (``flower-superlink``, ``flower-supernode``, ``flwr``), with
Flower's settings in a ``FLWR_HOME`` under ``--dir``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "add_commands", "run_command"]

COMMANDS = ("certs", "superlink", "register", "supernode", "deploy", "compare")
_DIR = "cluster"


def add_commands(sub: Any) -> None:
    """Add the cluster subcommands to ``sub`` (an argparse subparsers object)."""
    c = sub.add_parser("certs", help="write a TLS CA, the SuperLink certificate and "
                       "SuperNode key pairs")
    c.add_argument("dir", nargs="?", default=f"{_DIR}/certs")
    c.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="a name or address SuperNodes use to reach the SuperLink "
                   "(repeatable; 127.0.0.1 and localhost are always included)")
    c.add_argument("--node", action="append", default=[], metavar="NAME",
                   help="write a key pair nodes/NAME, nodes/NAME.pub (repeatable)")
    c.add_argument("--days", type=int, default=365)

    s = sub.add_parser("superlink", help="run a SuperLink (TLS, node authentication)")
    s.add_argument("--dir", default=_DIR, help="FLWR_HOME, state and logs go under here")
    s.add_argument("--certs", default=None, help="folder from `tinyfleet certs` "
                   "(default DIR/certs)")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on")
    s.add_argument("--port", type=int, default=9091)
    s.add_argument("--connect", default=None, metavar="HOST:PORT",
                   help="address the CLI on this machine uses (default 127.0.0.1:PORT)")
    s.add_argument("--insecure", action="store_true", help="no TLS (testing only)")
    s.add_argument("--no-node-auth", action="store_true",
                   help="let any SuperNode join (testing only)")

    r = sub.add_parser("register", help="let a SuperNode's public key join")
    r.add_argument("public_key")
    r.add_argument("--dir", default=_DIR)
    r.add_argument("--name", default="")

    n = sub.add_parser("supernode", help="run a SuperNode for one device")
    n.add_argument("--superlink", required=True, metavar="HOST:PORT")
    n.add_argument("--partition-id", type=int, required=True)
    n.add_argument("--num-partitions", type=int, required=True)
    n.add_argument("--device", default="", help="the device's profile name (e.g. rpi4)")
    n.add_argument("--ca", default=None, help="ca.crt from `tinyfleet certs` (omit only "
                   "with --insecure)")
    n.add_argument("--key", default=None, help="this node's private key (nodes/NAME)")
    n.add_argument("--port", type=int, default=9094, help="the node's local app port")
    n.add_argument("--dir", default=_DIR)
    n.add_argument("--insecure", action="store_true")
    n.add_argument("--emulate", action="store_true",
                   help="report the cost model's figures instead of measuring")

    d = sub.add_parser("deploy", help="run an experiment on the cluster (flwr run)")
    d.add_argument("config")
    d.add_argument("--dir", default=_DIR)
    d.add_argument("--out", default=None, help="results folder (default "
                   "results/<name>-cluster), written by the ServerApp on the SuperLink host")
    d.add_argument("--superlink", default=None, metavar="HOST:PORT",
                   help="(re)write the connection to this SuperLink")
    d.add_argument("--ca", default=None, help="with --superlink: the CA certificate")
    d.add_argument("--insecure", action="store_true", help="with --superlink: no TLS")
    d.add_argument("--timeout", type=float, default=3600.0)

    m = sub.add_parser("compare", help="set two result folders side by side")
    m.add_argument("a")
    m.add_argument("b")
    m.add_argument("--out", default=None, help="CSV to write (default B/compare.csv)")


def _home(args: argparse.Namespace) -> Path:
    return Path(args.dir) / "flwr"


def _exec(cmd: list[str], home: Path, extra: dict[str, str] | None = None) -> int:
    from sim.deploy import flwr_env

    home.mkdir(parents=True, exist_ok=True)
    print("+ " + " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, flwr_env(home, extra))
    return 1  # not reached


def run_command(args: argparse.Namespace) -> int:
    """Run a cluster subcommand; returns the exit status."""
    from sim import deploy

    if args.command == "certs":
        from sim.certs import DEFAULT_HOSTS, make_credentials

        # The loopback names stay: the CLI on the SuperLink host connects through them.
        hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *args.host]))
        cred = make_credentials(args.dir, hosts=hosts, nodes=args.node, days=args.days)
        print(f"SuperLink certificate for {', '.join(hosts)}")
        print(f"CA {cred.ca_cert}\nSuperLink {cred.server_cert} (key {cred.server_key})")
        for name, (priv, pub) in cred.node_keys.items():
            print(f"node {name}: {priv} (stays on the device), {pub} (register it)")
        return 0
    if args.command == "superlink":
        from sim.certs import Credentials

        home = _home(args)
        creds = None
        if not args.insecure:
            cdir = Path(args.certs or Path(args.dir) / "certs")
            creds = Credentials(cdir, cdir / "ca.crt", cdir / "ca.key", cdir / "server.crt",
                                cdir / "server.key")
            missing = [str(p) for p in (creds.ca_cert, creds.server_cert, creds.server_key)
                       if not p.is_file()]
            if missing:
                print(f"tinyfleet: error: missing {missing}; run `tinyfleet certs` first",
                      file=sys.stderr)
                return 2
        deploy.write_connection(home, args.connect or f"127.0.0.1:{args.port}",
                                creds.ca_cert if creds else None, insecure=args.insecure)
        cmd = deploy.superlink_command(args.port, creds, host=args.host,
                                       node_auth=not args.no_node_auth,
                                       database=(Path(args.dir) / "state.db").resolve())
        return _exec(cmd, home)
    if args.command == "register":
        node_id = deploy.register_node(_home(args), args.public_key, args.name)
        print(f"registered SuperNode {node_id} ({args.public_key})")
        return 0
    if args.command == "supernode":
        if not args.insecure and not args.ca:
            print("tinyfleet: error: --ca is required (or --insecure)", file=sys.stderr)
            return 2
        cmd = deploy.supernode_command(
            args.superlink, args.partition_id, args.num_partitions, args.device,
            root_certificates=None if args.insecure else Path(args.ca).resolve(),
            private_key=Path(args.key).resolve() if args.key else None,
            port=args.port, measure=not args.emulate)
        return _exec(cmd, Path(args.dir) / f"node-{args.partition_id}")
    if args.command == "deploy":
        from sim.config import load_config

        cfg = load_config(args.config)
        home = _home(args)
        if args.superlink:
            if not args.ca and not args.insecure:
                print("tinyfleet: error: --superlink needs --ca (or --insecure)",
                      file=sys.stderr)
                return 2
            deploy.write_connection(home, args.superlink, args.ca, insecure=args.insecure)
        out = Path(args.out or Path("results") / f"{Path(args.config).stem}-cluster")
        run_id = deploy.submit(cfg, out, home)
        print(f"run {run_id} started; waiting for {out / 'summary.json'}", flush=True)
        s = deploy.wait_for_run(home, run_id, out, timeout_s=args.timeout)
        print(f"run {run_id}: accuracy {s['final_accuracy']:.4f}  measured "
              f"{s['measured_time_s']:,.1f} s  trainings {s['trainings']}  "
              f"failures {s['failures']}  -> {out}")
        return 0
    if args.command == "compare":
        from sim.compare import compare, format_table, write_comparison

        rows = compare(args.a, args.b)
        print(format_table(rows))
        path = write_comparison(args.out or Path(args.b) / "compare.csv", rows)
        print(f"-> {path}")
        return 0
    return 1
