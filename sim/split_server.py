"""Split training's server side: the layers after the cut, one step per device and round.

Run with :mod:`clients.split`'s ClientApp (``run_experiment(cfg, out, client_app=
clients.split.app, server_app=sim.split_server.app)``), configured by a ``[split]`` table
(``clients.split.split_settings``). Each round (SplitFed-style, devices in parallel):

1. a share ``split.fraction`` of the fleet is drawn (seeded by run seed and round) and
   each drawn device gets a ``train`` message, ``phase = "forward"``, with the device-side
   weights; it replies with the features of its first batch;
2. ``split.steps`` times: for every features reply, in delivery order, the server decodes
   the features, runs its layers, computes the cross-entropy, backpropagates, takes one
   SGD step on its layers, and sends the device a ``train`` message, ``phase =
   "backward"``, with the encoded gradient with respect to the (decoded) features; the
   device steps and replies with its next batch's features, or after the last step with
   its weights (``clients.split``);
3. the devices' weights are averaged FedAvg-style (weighted by examples) into the next
   round's device-side weights. A device that fails a phase drops out of the round (and
   of this average); the server keeps the steps it took on the device's features.

Every message goes through the grid, so the engine measures its bytes and the devices'
communication time; the devices report their compute from the cost model
(``clients.split``). The server's own compute is not on any device's ledger (the cloud).
After each round (and round 0) the whole model (device part then server part) is
evaluated on the held-out test set and published to ``sim.results`` as the project's
ServerApp does.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import nn

from clients.client_app import build_client_model, fleet_data
from clients.split import SplitSettings, decode_array, encode_array, split_model, split_settings
from clients.training import evaluate_model
from devices.errors import PayloadError
from sim import results
from sim.server_app import config_from_run_config

__all__ = ["app", "average_states", "feature_bytes_up", "server_step"]

log = logging.getLogger("tinyfleet")

app = ServerApp()


def feature_bytes_up(devices: Sequence[Mapping[str, Any]]) -> int:
    """Uplink bytes of the replies that carried features (all but each device's last
    reply of a round, which carries its weights)."""
    by_key: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for d in devices:
        if d["message_type"] == "train" and d["status"] == "ok":
            by_key[(str(d["round"]), str(d["node_id"]))].append(d)
    total = 0
    for rows in by_key.values():
        rows = sorted(rows, key=lambda r: float(r["start_s"]))
        total += sum(int(r["bytes_up"]) for r in rows[:-1])
    return total


def average_states(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
                   ) -> dict[str, np.ndarray]:
    """The weighted mean of state dicts (FedAvg of the device-side layers)."""
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    return {k: np.tensordot(w, np.stack([np.asarray(s[k], dtype=np.float64) for s in states]),
                            axes=1).astype(np.float32)
            for k in states[0]}


def server_step(server: nn.Module, opt: torch.optim.Optimizer, feats: torch.Tensor,
                labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One SGD step of the server layers on decoded features; the loss and d loss/d feats."""
    f = feats.detach().clone().requires_grad_(True)
    opt.zero_grad()
    loss = F.cross_entropy(server(f), labels)
    loss.backward()
    opt.step()
    assert f.grad is not None
    return float(loss.detach()), f.grad.detach()


def _message(node: int, arrays: ArrayRecord, config: dict[str, Any], server_round: int
             ) -> Message:
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
                   dst_node_id=node, message_type="train", group_id=str(server_round))


def _state_record(module: nn.Module) -> ArrayRecord:
    return ArrayRecord(module.state_dict())


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``rounds`` rounds of split training (see the module docstring)."""
    cfg = config_from_run_config(context.run_config)
    s: SplitSettings = split_settings(cfg.doc.get("split"))
    run_key = str(context.run_config.get("tinyfleet.run-key", ""))
    spec = cfg.client
    torch.manual_seed(cfg.seed)
    data = fleet_data(spec)
    model = build_client_model(spec, data)
    device, server = split_model(model, s.cut)
    lr = s.lr or spec.train.lr
    opt = torch.optim.SGD(server.parameters(), lr=lr)
    with torch.no_grad():
        feat_shape = tuple(device(torch.zeros(1, *data.input_shape)).shape[1:])
    x_test, y_test = data.test_data()
    fraction = s.fraction or cfg.strategy.fraction_train

    def evaluate(server_round: int, train_loss: float | None) -> None:
        loss, acc = evaluate_model(model, x_test, y_test)
        row: dict[str, Any] = {"round": server_round, "accuracy": acc, "loss": loss}
        if train_loss is not None:
            row["train_loss"] = train_loss
        clock = getattr(grid, "clock", None)
        if clock is not None:
            row["clock_s"] = clock.now
        results.publish(run_key, "eval", row)

    evaluate(0, None)
    nodes = sorted(grid.get_node_ids())
    k = max(1, int(round(fraction * len(nodes))))
    for rnd in range(1, cfg.rounds + 1):
        chosen = random.Random(cfg.seed * 100003 + rnd).sample(nodes, min(k, len(nodes)))
        weights = _state_record(device)
        base = {"server-round": rnd, "lr": lr}
        fwd = [_message(n, weights, {**base, "phase": "forward", "steps": s.steps}, rnd)
               for n in chosen]
        losses: list[float] = []
        replies = list(grid.send_and_receive(fwd))
        for step in range(s.steps):
            back = []
            for reply in replies:
                if reply.has_error():
                    continue
                node = reply.metadata.src_node_id
                try:
                    arrays = reply.content.array_records["arrays"]
                    labels = torch.as_tensor(arrays["labels"].numpy()).long()
                    feats = decode_array(s.codec, arrays["features"].numpy(),
                                         (len(labels), *feat_shape))
                except (PayloadError, KeyError) as exc:
                    log.warning("round %d: node %d's features rejected (%s)", rnd, node, exc)
                    continue
                loss, grad = server_step(server, opt, feats, labels)
                losses.append(loss)
                rec = ArrayRecord(OrderedDict([("grad", Array(encode_array(s.grad_codec,
                                                                           grad)))]))
                config = {**base, "phase": "backward", "step": step, "steps": s.steps}
                back.append(_message(node, rec, config, rnd))
            replies = list(grid.send_and_receive(back)) if back else []
        states, counts = [], []
        for reply in replies:
            if reply.has_error() or "features" in reply.content.array_records["arrays"]:
                continue
            rec = reply.content.array_records["arrays"]
            states.append({key: rec[key].numpy() for key in rec})
            metrics = next(iter(reply.content.metric_records.values()))
            counts.append(float(metrics["num-examples"]))  # type: ignore[arg-type]
        if states:
            mean = average_states(states, counts)
            device.load_state_dict({key: torch.from_numpy(v) for key, v in mean.items()})
        evaluate(rnd, float(np.mean(losses)) if losses else None)
    results.publish(run_key, "final", ArrayRecord(model.state_dict()))
