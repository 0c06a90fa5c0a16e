"""Flower client mods that report a device's exact cost figures for any ClientApp.

``device_cost_mod`` runs the rest of the app under torch's ``FlopCounterMode`` and adds to
the reply's ``MetricRecord`` what the engine reads: ``macs`` (forward and backward MACs the
app really executed) and ``compute-s`` / ``energy-j`` on the node's device profile (named by
``node_config["device"]``), so that an app that reports nothing gets deterministic device
times instead of scaled host times. Counting costs several times the step itself: use it
where exact, repeatable figures matter more than speed.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from torch.utils.flop_counter import FlopCounterMode

from devices.profiles import load_profile

__all__ = ["device_cost_mod"]


def device_cost_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Count the MACs the app executes and report its compute time on the device."""
    with FlopCounterMode(display=False) as counter:
        reply = call_next(msg, ctxt)
    if reply.has_error() or not reply.has_content():
        return reply
    name = ctxt.node_config.get("device")
    if not name:
        return reply
    profile = load_profile(str(name))
    macs = counter.get_total_flops() // 2
    compute_s = macs / profile.macs_per_s["fp32"]
    records = reply.content.metric_records
    rec = next(iter(records.values())) if records else None
    if rec is None:
        rec = MetricRecord()
        reply.content["device-cost"] = rec
    if "compute-s" not in rec:
        rec["macs"] = int(macs)
        rec["compute-s"] = compute_s
        rec["energy-j"] = compute_s * profile.power_compute_w
    return reply
