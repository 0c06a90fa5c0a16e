"""CompressedBoundary: a split-learning cut whose features and gradients travel as payloads."""

from __future__ import annotations

import torch
from torch import nn

from clients.codecs import CompressedBoundary, get_codec

STRIPE_SLACK = 2 ** (1 / 8)


def _nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    device = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
    server = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 64, 4))
    return device, server


def test_forward_values_are_what_the_receiver_decodes_and_bytes_are_counted() -> None:
    device, server = _nets()
    cut = CompressedBoundary("sgq:layout=feature,bits=4,alloc=uniform", None)
    x = torch.randn(4, 3, 8, 8)
    feats = device(x)
    sent = cut(feats)
    codec = get_codec("sgq:layout=feature,bits=4,alloc=uniform")
    payload = codec.encode({"t": feats.detach().numpy()})
    assert torch.equal(sent, torch.from_numpy(codec.decode(payload)["t"]))
    assert cut.bytes_forward == len(payload) < feats.numel() * 4 / 6
    # post-ReLU maps use the unsigned grid: error <= range / (2 * 15), zeros stay zero
    assert (sent - feats).abs().max() <= STRIPE_SLACK * feats.abs().max() / 30 + 1e-6
    assert torch.all(sent[feats == 0] == 0)


def test_gradient_crosses_back_with_bounded_deviation() -> None:
    device, server = _nets()
    x = torch.randn(4, 3, 8, 8)
    exact = CompressedBoundary("fp32", None)
    lossy = CompressedBoundary("fp32", "sgq:layout=feature,bits=6,alloc=uniform")
    grads = []
    for cut in (exact, lossy):
        feats = device(x).detach().requires_grad_(True)
        server(cut(feats)).square().sum().backward()
        assert feats.grad is not None
        grads.append(feats.grad.clone())
    g, gq = grads
    assert lossy.bytes_backward > 0 and exact.bytes_backward == 0
    assert not torch.equal(g, gq)
    assert (gq - g).abs().max() <= STRIPE_SLACK * g.abs().max() / 2**6 + 1e-6
    # and it reaches the device's parameters: training through the cut works
    device.zero_grad()
    server(lossy(device(x))).square().sum().backward()
    conv = next(device.children())
    assert isinstance(conv, nn.Conv2d) and conv.weight.grad is not None
    assert torch.isfinite(conv.weight.grad).all()
