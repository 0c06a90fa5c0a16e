"""Benchmark of the update codecs: SGQ side by side with every baseline.

Two parts; ``--codec-only`` or ``--fleet-only`` runs one of them (the JSON keeps the other
part of an earlier run).

Codecs (``--codec-only``): encode and decode a MobileNetV2-1.0 update
(``clients.models.MobileNetV2`` state_dict, 3.5 M parameters, 14.2 MB of FP32) with each
codec on one thread (one core), and report bytes, compression ratio vs FP32, relative L2
error of the decoded update, encode / decode MB/s (of FP32 input) and the combined
encode+decode throughput, whose goal for SGQ is 200 MB/s. Three inputs are measured:

- ``trained``: the real difference of the weights after a few SGD steps of MobileNetV2 on
  scikit-learn digits (upsampled to 32x32 RGB), so channels differ in scale as in FL;
- ``gaussian``: i.i.d. N(0, 0.01^2) values, the worst case for channel grouping;
- ``features``: the paper's own case, feature maps ``(N, C, H, W)`` that a split-learning
  device would send (three MobileNetV2 layers of the trained model, 32 digits at 96x96),
  SGQ with ``layout=feature`` (rows of the maps as stripes).

Error feedback starts from an empty residual (one round), so the error column is that of a
single update. ``rel.err`` is over every float tensor, ``w.err`` over the conv and linear
weights only (BatchNorm running statistics move much more than weights in a few steps and
dominate the first; SGQ sends 1-D tensors exactly). The classifier has 1,000 outputs but
the digits only 10 classes, so 990 of its rows do not move: a real trait of such updates.
Timings are the best of ``--repeats`` runs of each codec, interleaved in the same process,
in CPU seconds of this single-threaded process (``MB/s`` columns: what one core does,
little changed by other processes on a shared machine) and in wall seconds (``wall``:
encode+decode, inflated by load); ``t/fp32`` is the encode+decode CPU time relative to
the exact fp32 codec in the same run.

Fleet (``--fleet-only``): the engine's run of ``--config`` (default: the default fleet,
100 devices on digits) for each of ``--seeds`` (1 2 3), plain Flower vs compressed
uplink (and downlink) through ``compression_mod`` and ``CompressedStrategy``: final
accuracy, bytes up / down on the wire (the engine's count), stragglers, emulated clock.

Writes ``bench/out/sgq.json`` and prints tables. Run:
``.venv/bin/python bench/sgq.py --codec-only`` (about a minute on 2 cores),
``.venv/bin/python bench/sgq.py --fleet-only`` (about 4 minutes), or both without a flag.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clients.codecs import get_codec
from clients.models import MobileNetV2

OUT = Path(__file__).resolve().parent / "out" / "sgq.json"
CODECS = [
    "fp32", "fp16", "uniform8", "uniform4", "blockwise4-ef", "qsgd", "ef-signsgd",
    "topk:ratio=0.01", "sgq", "sgq:bits=2", "sgq:bits=3", "sgq:bits=6", "sgq:bits=8",
    "sgq:budget=tensor", "sgq:alloc=uniform", "sgq:small=int8", "sgq:bits=2,small=int8",
]
FEATURE_CODECS = [
    "fp32", "fp16", "uniform8", "uniform4", "blockwise4-ef", "topk:ratio=0.1",
    "sgq:layout=feature", "sgq:layout=feature,bits=2", "sgq:layout=feature,bits=3",
    "sgq:layout=feature,alloc=uniform", "sgq:layout=weight",
]


@contextlib.contextmanager
def _one_core() -> Iterator[str]:
    """Measure on one core: a single thread (numpy's elementwise work is single-threaded;
    torch is set to one thread). The process is not pinned to a fixed CPU, so that on a
    shared machine the scheduler can give it whichever core is free."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield "single thread, not pinned"
    finally:
        torch.set_num_threads(threads)


def _digits(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:256], dtype=torch.float32)[:, None] / 16.0
    return F.interpolate(x, size=side, mode="bilinear").repeat(1, 3, 1, 1), \
        torch.tensor(digits.target[:256])


def _trained_update(steps: int, seed: int) -> tuple[dict[str, np.ndarray], MobileNetV2]:
    """Weights after ``steps`` SGD steps minus weights before (MobileNetV2-1.0)."""
    torch.manual_seed(seed)
    model = MobileNetV2(1.0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = _digits(32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(steps):
        sl = slice((i * 32) % 256, (i * 32) % 256 + 32)
        loss = F.cross_entropy(model(x[sl]), y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    return {k: (after[k] - before[k]).numpy() for k in before}, model


@torch.no_grad()
def _feature_maps(model: MobileNetV2) -> dict[str, np.ndarray]:
    """Activations a split-learning device would send: (N, C, H, W) maps of 32 digits.

    ``features.0`` is a conv-BN-ReLU6 output (non-negative), ``features.3`` and
    ``features.6`` are linear-bottleneck block outputs (signed), at a 96x96 input.
    """
    model.eval()
    x, _ = _digits(96)
    maps: dict[str, np.ndarray] = {}
    h = x[:32]
    layers: list[torch.nn.Module] = list(model.features.children())[:7]
    for i, layer in enumerate(layers):
        h = layer(h)
        if i in (0, 3, 6):
            maps[f"features.{i}"] = h.numpy().copy()
    return maps


def _gaussian_update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in MobileNetV2(1.0).state_dict().items():
        a = v.numpy()
        out[k] = (rng.standard_normal(a.shape) * 0.01).astype(np.float32) \
            if a.dtype.kind == "f" else np.zeros_like(a)
    return out


def _rel_l2(dec: dict[str, np.ndarray], ref: dict[str, np.ndarray], min_ndim: int = 0
            ) -> float:
    num = den = 0.0
    for k, v in ref.items():
        if v.dtype.kind == "f" and v.ndim >= min_ndim:
            d = dec[k].astype(np.float64) - v
            num += float(np.dot(d.ravel(), d.ravel()))
            den += float(np.dot(v.ravel().astype(np.float64), v.ravel()))
    return (num / den) ** 0.5 if den else 0.0


def measure(update: dict[str, np.ndarray], specs: list[str], repeats: int
            ) -> list[dict[str, Any]]:
    """Bytes, ratio, error and throughput of each codec on ``update``.

    Throughput is measured twice: over the CPU time of this (single-threaded) process,
    which is what one core delivers and what load from other processes barely changes,
    and over wall time (``*_wall``), which a loaded machine inflates.
    """
    fp32_bytes = sum(v.nbytes for v in update.values())
    codecs = [get_codec(s) for s in specs]
    best: dict[str, dict[str, float]] = {s: {"enc": np.inf, "dec": np.inf, "enc_wall": np.inf,
                                             "dec_wall": np.inf} for s in specs}
    results: dict[str, dict[str, Any]] = {}
    for _ in range(repeats):  # interleaved, so load changes hit every codec alike
        for spec, codec in zip(specs, codecs, strict=True):
            state: dict[str, np.ndarray] = {}
            c0, t0 = time.process_time(), time.perf_counter()
            payload = codec.encode(update, state)
            c1, t1 = time.process_time(), time.perf_counter()
            out = codec.decode(payload)
            c2, t2 = time.process_time(), time.perf_counter()
            b = best[spec]
            for key, value in (("enc", c1 - c0), ("dec", c2 - c1), ("enc_wall", t1 - t0),
                               ("dec_wall", t2 - t1)):
                b[key] = min(b[key], max(value, 1e-9))
            if spec not in results:
                results[spec] = {"codec": spec, "canonical": codec.spec, "bytes": len(payload),
                                 "ratio": fp32_bytes / len(payload),
                                 "rel_l2_error": _rel_l2(out, update),
                                 "rel_l2_error_weights": _rel_l2(out, update, min_ndim=2)}
    mb = fp32_bytes / 1e6
    ref = best["fp32"]
    for spec in specs:
        r, b = results[spec], best[spec]
        r["encode_MBps"] = mb / b["enc"]
        r["decode_MBps"] = mb / b["dec"]
        r["enc_dec_MBps"] = mb / (b["enc"] + b["dec"])
        r["enc_dec_MBps_wall"] = mb / (b["enc_wall"] + b["dec_wall"])
        r["time_vs_fp32"] = (b["enc"] + b["dec"]) / (ref["enc"] + ref["dec"])
    return [results[s] for s in specs]


def _table(title: str, rows: list[dict[str, Any]]) -> str:
    lines = [title, f"{'codec':34s} {'bytes':>10s} {'ratio':>7s} {'rel.err':>8s} "
             f"{'w.err':>7s} "
             f"{'enc MB/s':>9s} {'dec MB/s':>9s} {'enc+dec':>8s} {'wall':>6s} {'t/fp32':>7s}"]
    for r in rows:
        lines.append(f"{r['codec']:34s} {r['bytes']:10d} {r['ratio']:7.2f} "
                     f"{r['rel_l2_error']:8.4f} {r['rel_l2_error_weights']:7.4f} "
                     f"{r['encode_MBps']:9.0f} {r['decode_MBps']:9.0f} "
                     f"{r['enc_dec_MBps']:8.0f} {r['enc_dec_MBps_wall']:6.0f} "
                     f"{r['time_vs_fp32']:7.2f}")
    return "\n".join(lines)


FLEET: list[tuple[str | None, str | None, str]] = [
    # (uplink, downlink, keyframe); None is plain Flower (no compression anywhere)
    # (a lossy keyframe means every downlink message is a keyframe: no node holds the
    # server's model exactly, so the downlink codec itself is not used)
    (None, None, "fp32"), ("sgq", None, "fp32"), ("sgq", "sgq", "fp32"),
    ("sgq:bits=2", "sgq:bits=2", "fp32"), ("sgq", "sgq", "sgq:bits=8"),
    ("uniform4", None, "fp32"), ("blockwise4-ef", None, "fp32"),
    ("topk:ratio=0.01", None, "fp32"),
]


@contextlib.contextmanager
def _compressed_server(uplink: str, downlink: str | None, keyframe: str) -> Iterator[None]:
    """Wrap the engine's configured strategy in CompressedStrategy for one run."""
    import sim.server_app as server_app
    from strategies.compressed import CompressedStrategy

    plain = server_app.make_strategy
    server_app.make_strategy = lambda cfg: CompressedStrategy(plain(cfg), uplink, downlink,
                                                              keyframe)
    try:
        yield
    finally:
        server_app.make_strategy = plain


def _compressed_client_app() -> Any:
    """tinyfleet's ClientApp behind ``compression_mod`` (codec named by the server)."""
    from flwr.clientapp import ClientApp

    from clients.client_app import app as base
    from clients.codecs import compression_mod

    app = ClientApp(mods=[compression_mod()])
    app.train()(lambda msg, ctx: base(msg, ctx))
    app.evaluate()(lambda msg, ctx: base(msg, ctx))
    return app


def fleet(config: str, seeds: list[int], rounds: int | None) -> list[dict[str, Any]]:
    """Accuracy and bytes on the wire of the engine's run of ``config`` for each codec.

    Bytes are the engine's own count of what crossed each device's link (message
    payloads plus framing), summed over rounds; accuracy is the server's held-out
    accuracy after the last round; stragglers (replies past the round deadline) and the
    emulated clock at the end show what smaller messages buy on slow links. Mean (and
    accuracy's spread) over ``seeds``.
    """
    from sim.config import load_config
    from sim.runner import run_experiment

    base = load_config(config)
    out: list[dict[str, Any]] = []
    for uplink, downlink, keyframe in FLEET:
        runs = []
        for seed in seeds:
            cfg = base.with_overrides(seed=seed, **({"rounds": rounds} if rounds else {}))
            t0 = time.perf_counter()
            if uplink is None:
                res = run_experiment(cfg)
            else:
                with _compressed_server(uplink, downlink, keyframe):
                    res = run_experiment(cfg, client_app=_compressed_client_app())
            rows = res.rounds
            runs.append({"seed": seed, "accuracy": float(rows[-1]["accuracy"]),
                         "bytes_up": int(sum(r["bytes_up"] for r in rows)),
                         "bytes_down": int(sum(r["bytes_down"] for r in rows)),
                         "failures": int(sum(r["failures"] for r in rows)),
                         "stragglers": int(sum(r["stragglers"] for r in rows)),
                         "clock_s": float(rows[-1]["clock_s"]),
                         "wall_s": time.perf_counter() - t0})
        acc = np.array([r["accuracy"] for r in runs])
        out.append({"uplink": uplink or "plain", "downlink": downlink or "plain",
                    "keyframe": keyframe if downlink else "-",
                    "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
                    "bytes_up_mean": float(np.mean([r["bytes_up"] for r in runs])),
                    "bytes_down_mean": float(np.mean([r["bytes_down"] for r in runs])),
                    "stragglers_mean": float(np.mean([r["stragglers"] for r in runs])),
                    "clock_s_mean": float(np.mean([r["clock_s"] for r in runs])),
                    "runs": runs})
    up0, down0 = float(out[0]["bytes_up_mean"]), float(out[0]["bytes_down_mean"])
    for r in out:
        r["up_ratio_vs_plain"] = up0 / float(r["bytes_up_mean"])
        r["down_ratio_vs_plain"] = down0 / float(r["bytes_down_mean"])
    return out


def _fleet_table(title: str, rows: list[dict[str, Any]]) -> str:
    lines = [title, f"{'uplink':16s} {'downlink':11s} {'keyframe':11s} {'accuracy':>15s} "
             f"{'MB up':>8s} "
             f"{'x up':>6s} {'MB down':>8s} {'x down':>6s} {'stragglers':>10s} {'clock s':>8s}"]
    for r in rows:
        lines.append(f"{r['uplink']:16s} {r['downlink']:11s} {r['keyframe']:11s} "
                     f"{r['accuracy_mean']:8.3f} "
                     f"+-{r['accuracy_std']:.3f} {r['bytes_up_mean'] / 1e6:8.2f} "
                     f"{r['up_ratio_vs_plain']:6.2f} {r['bytes_down_mean'] / 1e6:8.2f} "
                     f"{r['down_ratio_vs_plain']:6.2f} {r['stragglers_mean']:10.1f} "
                     f"{r['clock_s_mean']:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codec-only", action="store_true",
                    help="measure the codecs alone, not the fleet runs")
    ap.add_argument("--fleet-only", action="store_true",
                    help="only the fleet runs (accuracy and bytes on the engine)")
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=None, help="override the config's rounds")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="SGD steps of the trained update")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.codec_only and args.fleet_only:
        ap.error("--codec-only and --fleet-only exclude each other")
    report: dict[str, Any] = {}
    if not args.fleet_only:
        report.update(codec_report(args))
    if not args.codec_only:
        rows = fleet(args.config, args.seeds, args.rounds)
        report["fleet"] = {"config": args.config, "seeds": args.seeds, "results": rows}
        print(_fleet_table(f"\nfleet: {args.config}, seeds {args.seeds} (engine's byte "
                           "counts, summed over rounds; final held-out accuracy)", rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists() and (args.codec_only or args.fleet_only):
        old = json.loads(args.out.read_text())  # keep the other half of an earlier run
        report = {**old, **report}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


def codec_report(args: argparse.Namespace) -> dict[str, Any]:
    """The codec-only measurements (tables printed, results returned)."""
    trained, model = _trained_update(args.steps, args.seed)
    updates = {"trained": trained, "gaussian": _gaussian_update(args.seed)}
    features = _feature_maps(model)
    with _one_core() as pinning:
        n = sum(v.size for v in updates["trained"].values())
        report: dict[str, Any] = {
            "model": "MobileNetV2(1.0) state_dict", "parameters": int(n),
            "fp32_bytes": int(sum(v.nbytes for v in updates["trained"].values())),
            "cpu": platform.processor() or platform.machine(), "pinning": pinning,
            "repeats": args.repeats, "numpy": np.__version__, "results": {},
        }
        for name, upd in updates.items():
            rows = measure(upd, CODECS, args.repeats)
            report["results"][name] = rows
            mb = report["fp32_bytes"] / 1e6
            print(_table(f"\n{name} update ({n / 1e6:.2f} M params, {mb:.1f} MB FP32, one "
                         f"core, best of {args.repeats})", rows))
        fbytes = sum(v.nbytes for v in features.values())
        rows = measure(features, FEATURE_CODECS, args.repeats)
        report["results"]["features"] = rows
        report["feature_maps"] = {k: list(v.shape) for k, v in features.items()}
        print(_table(f"\nfeature maps {report['feature_maps']} ({fbytes / 1e6:.1f} MB FP32, one "
                     f"core, best of {args.repeats})", rows))
    sgq = next(r for r in report["results"]["trained"] if r["codec"] == "sgq")
    report["goal_enc_dec_MBps"] = 200.0
    report["goal_met"] = bool(sgq["enc_dec_MBps"] >= 200.0)
    print(f"\nSGQ-4 encode+decode: {sgq['enc_dec_MBps']:.0f} MB/s (goal 200 MB/s: "
          f"{'met' if report['goal_met'] else 'NOT met'})")
    return report


if __name__ == "__main__":
    raise SystemExit(main())
