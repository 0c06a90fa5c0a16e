"""Benchmark of PASS patch skipping: full computation, threshold gates and learned gate.

Per seed: train ``PerceptionNet`` (batch norm, then folded into the convolutions) on
generated 48x48 streams of "train" digits (digit switches every 5-7 frames), prepare it
three times, train the learned gates on 16-frame clips of those streams (backbone frozen:
every variant shares the very same weights), then run four variants side by side, frame
by frame, on two test streams of unseen ("test") digits at ``--size`` px, the digit
switching every 12 frames (not a multiple of the key-frame period 16):

- ``full``: the unmodified model (channels-last, its faster layout here);
- ``threshold-patch``: the literal baseline gate, mean |x_t - x_{t-1}| over the patch > tau;
- ``threshold``: the same, halo-aware (a change also triggers the neighbours it reaches
  through the block's receptive field);
- ``learned``: the learned gate (threshold prior + bounded learned residual, Gumbel /
  straight-through training with a sparsity loss and distillation from the full model).

Streams:

- ``static``: one slow sprite over a still background (``clients.video.STATIC_BACKGROUND``);
- ``high-motion``: three fast sprites, a drifting background, a shaky camera and sensor
  noise (``clients.video.HIGH_MOTION``), where the gain honestly shrinks.

Each stream is played twice: once to warm up, once measured (every variant reset first).
Within a frame the variants run in an order that rotates per frame, each timed alone
(``time.perf_counter``; ``time.thread_time`` too, as ``cpu x``, which a busy shared
machine disturbs less), one thread. Reported per (stream, variant), mean over seeds:
``mac x`` = full MACs / executed MACs (the executed ones counted analytically per computed
patch, halos, gates, head and key frames included), ``speed x`` = full wall-clock /
variant wall-clock, ``acc`` = per-frame accuracy of the digit class, ``agree`` = share of
frames whose prediction equals the full model's, ``patches`` = share of patches computed.

Writes ``bench/out/pass.json`` and prints a table. Run:
``.venv/bin/python bench/pass.py`` (a few minutes on one core) or ``--quick`` (CI-sized,
under a minute; too little training and too short streams for the goals).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clients.pass_skip import (
    PassModel,
    PerceptionNet,
    fold_batch_norm,
    prepare,
    train_gates,
    train_perception,
)
from clients.video import HIGH_MOTION, STATIC_BACKGROUND, VideoStreamConfig, generate_stream

OUT = Path(__file__).resolve().parent / "out" / "pass.json"
VARIANTS = ("full", "threshold-patch", "threshold", "learned")


def _training_streams(n: int, frames: int, size: int, seed: int) -> list[Any]:
    """A mix of still, moderate and high-motion streams of training digits."""
    base = VideoStreamConfig(height=size, width=size, num_frames=frames, digit_split="train")
    # Digit switches every 5-7 frames, so that 8-frame clips contain switches at gated
    # frames: a gate that never computes is then punished by the task loss.
    kinds = [
        replace(base, speed=1.0),
        replace(base, speed=3.0, num_sprites=2),
        replace(
            base, speed=4.0, num_sprites=3, background_drift=0.5, camera_jitter=1.0, noise=0.01
        ),
    ]
    return [
        generate_stream(replace(kinds[i % 3], switch_every=5 + i % 3), seed * 1000 + i)
        for i in range(n)
    ]


def _clips(streams: list[Any], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    clips, labels = [], []
    for s in streams:
        for start in range(0, len(s) - length + 1, length):
            clips.append(torch.from_numpy(s.frames[start : start + length]))
            labels.append(torch.from_numpy(s.labels[start : start + length]))
    return torch.stack(clips), torch.stack(labels)


class _Full:
    """The unmodified model, frame by frame, with the same interface as PassModel.

    Channels-last, as PASS runs: on this CPU it was the faster layout for the full model
    too (about 5.5 against 8.7 ms per 96x96 frame), so the baseline is not handicapped.
    """

    def __init__(self, net: nn.Module) -> None:
        self.net = copy.deepcopy(net).to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # as PassModel runs, so neither pays autograd's tracking
            return self.net(frame[None].contiguous(memory_format=torch.channels_last))

    def reset(self) -> None:
        pass


def _play(
    variants: dict[str, Any], frames: torch.Tensor, labels: np.ndarray
) -> dict[str, dict[str, float]]:
    """Play a stream through every variant, interleaved; returns per-variant metrics."""
    names = list(variants)
    for _ in range(2):  # warm-up pass, then the measured one
        for v in variants.values():
            v.reset()
            if isinstance(v, PassModel):
                v.reset_stats()
        seconds = dict.fromkeys(names, 0.0)
        cpu = dict.fromkeys(names, 0.0)
        preds: dict[str, list[int]] = {n: [] for n in names}
        for t in range(frames.shape[0]):
            k = t % len(names)
            for name in names[k:] + names[:k]:
                start, start_cpu = time.perf_counter(), time.thread_time()
                out = variants[name](frames[t])
                seconds[name] += time.perf_counter() - start
                cpu[name] += time.thread_time() - start_cpu
                preds[name].append(int(out.argmax()))
    ref = np.array(preds["full"])
    results: dict[str, dict[str, float]] = {}
    for name in names:
        p = np.array(preds[name])
        v = variants[name]
        row = {
            "ms_per_frame": 1e3 * seconds[name] / frames.shape[0],
            "speedup": seconds["full"] / seconds[name],
            "cpu_speedup": cpu["full"] / cpu[name],
            "accuracy": float((p == labels).mean()),
            "agreement": float((p == ref).mean()),
        }
        if isinstance(v, PassModel):
            st = v.stats()
            row["mac_reduction"] = st["full_macs"] / st["executed_macs"]
            row["patch_share"] = st["executed_patches"] / st["total_patches"]
            row["gate_mac_share"] = st["gate_macs"] / st["executed_macs"]
            row["full_macs_per_frame"] = st["full_macs"] / st["frames"]
        else:
            row["mac_reduction"] = 1.0
            row["patch_share"] = 1.0
            row["gate_mac_share"] = 0.0
        results[name] = row
    return results


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train = _training_streams(args.train_streams, 32, args.train_size, seed)
    x = torch.from_numpy(np.concatenate([s.frames for s in train]))
    y = torch.from_numpy(np.concatenate([s.labels for s in train]))
    net = PerceptionNet(width=args.width)
    losses = train_perception(net, x, y, steps=args.train_steps, batch_size=32, lr=2e-3, seed=seed)
    fold_batch_norm(net)
    t1 = time.perf_counter()
    common = {
        "patch": args.patch,
        "keyframe_every": args.keyframe_every,
        "dense_above": args.dense_above,
    }
    literal = prepare(net, gate="threshold", threshold=args.threshold, halo_aware=False, **common)
    threshold = prepare(net, gate="threshold", threshold=args.threshold, **common)
    learned = prepare(net, gate="learned", **common)
    clips, clip_labels = _clips(train, args.clip_length)
    history = train_gates(
        learned,
        clips,
        clip_labels,
        steps=args.gate_steps,
        batch_size=args.gate_batch,
        lr=args.gate_lr,
        sparsity=args.sparsity,
        distill=args.distill,
        seed=seed,
    )
    t2 = time.perf_counter()
    streams = {"static": STATIC_BACKGROUND, "high-motion": HIGH_MOTION}
    out: dict[str, Any] = {
        "seed": seed,
        "train_loss_last": float(np.mean(losses[-10:])),
        "gate_history_last": history[-1],
        "train_seconds": t1 - t0,
        "gate_seconds": t2 - t1,
        "streams": {},
    }
    variants = {
        "full": _Full(net),
        "threshold-patch": literal,
        "threshold": threshold,
        "learned": learned,
    }
    for name, cfg in streams.items():
        cfg = replace(
            cfg,
            height=args.size,
            width=args.size,
            num_frames=args.frames,
            digit_split="test",
            switch_every=args.switch_every,
        )
        s = generate_stream(cfg, 10_000 + seed)
        out["streams"][name] = _play(variants, torch.from_numpy(s.frames), s.labels)
    out["eval_seconds"] = time.perf_counter() - t2
    return out


def _summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for stream in runs[0]["streams"]:
        summary[stream] = {}
        for variant in VARIANTS:
            rows = [r["streams"][stream][variant] for r in runs]
            summary[stream][variant] = {}
            for key in rows[0]:
                values = np.array([row[key] for row in rows])
                summary[stream][variant][key] = float(values.mean())
                summary[stream][variant][key + "_std"] = float(values.std())
    return summary


def _print(summary: dict[str, dict[str, dict[str, float]]], seeds: int) -> None:
    print(f"\nPASS on PerceptionNet, mean (std) over {seeds} seed(s)")
    head = f"{'stream':<12} {'variant':<16} {'ms/frame':>9} {'speed x':>13} {'cpu x':>6}"
    head += f" {'mac x':>13}"
    head += f" {'patches':>8} {'acc':>7} {'agree':>7}"
    print(head)
    print("-" * len(head))
    for stream, by_variant in summary.items():
        for variant, m in by_variant.items():
            print(
                f"{stream:<12} {variant:<16} {m['ms_per_frame']:9.2f} "
                f"{m['speedup']:6.2f} ({m['speedup_std']:4.2f}) {m['cpu_speedup']:6.2f} "
                f"{m['mac_reduction']:6.2f} ({m['mac_reduction_std']:4.2f}) "
                f"{m['patch_share']:8.3f} {100 * m['accuracy']:6.1f}% {100 * m['agreement']:6.1f}%"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=96, help="test frame side (px)")
    parser.add_argument("--train-size", type=int, default=48, help="training frame side")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--keyframe-every", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.02)
    parser.add_argument(
        "--dense-above",
        type=float,
        default=0.5,
        help="a block whose gate chooses more than this share of patches runs densely",
    )
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument(
        "--switch-every",
        type=int,
        default=12,
        help="frames between digit changes in the test streams (not a multiple of the "
        "key-frame period, so a cache cannot ride on key frames alone)",
    )
    parser.add_argument("--train-streams", type=int, default=30)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--gate-steps", type=int, default=40)
    parser.add_argument("--gate-lr", type=float, default=1e-2)
    parser.add_argument("--sparsity", type=float, default=1.0)
    parser.add_argument("--clip-length", type=int, default=16)
    parser.add_argument("--gate-batch", type=int, default=4)
    parser.add_argument("--distill", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.quick:
        args.seeds = args.seeds[:1]
        args.frames, args.train_streams = 48, 9
        args.train_steps, args.gate_steps = 30, 5
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args))
        r = runs[-1]
        print(
            f"seed {seed}: train {r['train_seconds']:.0f}s (loss {r['train_loss_last']:.3f}), "
            f"gates {r['gate_seconds']:.0f}s (compute {r['gate_history_last']['compute']:.2f}), "
            f"eval {r['eval_seconds']:.0f}s"
        )
    summary = _summary(runs)
    _print(summary, len(runs))
    result = {
        "benchmark": "pass",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "summary": summary,
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} in {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
