"""Split training on the fleet: devices send compressed features, the server the gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

import clients.split
import sim.split_server
from clients.client_app import build_client_model, fleet_data
from clients.split import decode_array, device_forward, split_model, split_settings
from devices.errors import ConfigError, PayloadError
from sim.config import load_config
from sim.runner import RunResult, run_experiment
from sim.split_server import feature_bytes_up

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "split.toml"
STRIPE_SLACK = 2 ** (1 / 8)


def _run(codec: str, rounds: int = 8) -> RunResult:
    cfg = load_config(CONFIG).with_overrides(
        rounds=rounds, **{"split.codec": codec, "split.grad_codec": codec})
    return run_experiment(cfg, None, client_app=clients.split.app,
                          server_app=sim.split_server.app)


@pytest.mark.slow
def test_split_run_learns_and_sgq_sends_far_fewer_bytes_up() -> None:
    fp32, sgq = _run("fp32"), _run("sgq:layout=feature")
    for r in (fp32, sgq):
        assert r.summary["failures"] == 0
        assert r.summary["final_accuracy"] > 0.4  # 10 classes: chance is 0.1
        assert all(d["message_type"] == "train" for d in r.devices)
    # 5 drawn devices x (1 forward + 8 backward messages) per round, all on the ledger
    assert len(sgq.devices) == 8 * 5 * 9
    ratio_features = feature_bytes_up(fp32.devices) / feature_bytes_up(sgq.devices)
    assert ratio_features > 4
    assert fp32.summary["bytes_up"] > 3 * sgq.summary["bytes_up"]
    assert fp32.summary["bytes_down"] > 3 * sgq.summary["bytes_down"]
    assert sgq.summary["emulated_time_s"] < fp32.summary["emulated_time_s"]


@pytest.mark.parametrize(("codec", "levels"), [
    ("sgq:layout=feature,bits=4,alloc=uniform", 15),
    ("sgq:layout=feature", 3),  # energy allocation, min_bits=2: the worst block has 3 levels
])
def test_server_decodes_the_devices_features_within_the_codec_bound(
        codec: str, levels: int) -> None:
    cfg = load_config(CONFIG).with_overrides(**{"split.codec": codec})
    settings = split_settings(cfg.doc["split"])
    torch.manual_seed(0)
    device, _ = split_model(build_client_model(cfg.client, fleet_data(cfg.client)),
                            settings.cut)
    weights = ArrayRecord(device.state_dict())
    feats, payload, labels = device_forward(cfg.client, settings, 3, 2, weights)
    assert payload.dtype == np.uint8 and payload.size < feats.numel() * 4 / 4
    got = decode_array(settings.codec, payload, tuple(feats.shape))
    assert got.shape == feats.shape and len(labels) == feats.shape[0]
    assert not torch.equal(got, feats)
    # post-ReLU (and max-pooled) maps use the unsigned grid: error <= range / (2 * levels)
    assert (got - feats).abs().max() <= STRIPE_SLACK * feats.max() / (2 * levels) + 1e-6
    # the same draw again: the device's backward phase sees the batch it sent
    again, _, labels2 = device_forward(cfg.client, settings, 3, 2, weights)
    assert torch.equal(again, feats) and torch.equal(labels2, labels)


def test_bad_split_input_is_rejected_with_its_field() -> None:
    with pytest.raises(ConfigError, match="split: unknown"):
        split_settings({"codecs": "fp32"})
    with pytest.raises(ConfigError, match="split.codec"):
        split_settings({"codec": "nope"})
    with pytest.raises(ConfigError, match="split.steps"):
        split_settings({"steps": 0})
    with pytest.raises(ConfigError, match="split.cut"):
        split_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), "classifier")
    with pytest.raises(PayloadError, match="uint8"):
        decode_array("fp32", np.zeros(4, dtype=np.float32), (1,))
    good = clients.split.encode_array("fp32", torch.ones(2, 3))
    with pytest.raises(PayloadError):
        decode_array("fp32", good[:-3], (2, 3))
