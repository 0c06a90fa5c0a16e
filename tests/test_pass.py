"""Tests of PASS patch skipping (clients.pass_skip): exactness, real skipping, key frames."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

from clients.pass_skip import (
    LayerSpec,
    PassModel,
    PatchConv,
    PerceptionNet,
    StridedMaxPool2d,
    gather_cells,
    gumbel_gate,
    mask_table,
    neighbour_max,
    pad_map,
    plan_block,
    prepare,
    put_cells,
    to_pixel_major,
    train_gates,
    window_table,
)
from devices.errors import ConfigError, DataError

torch.manual_seed(0)


def _net() -> PerceptionNet:
    torch.manual_seed(1)
    # Channels-last, like the prepared copy, so the full model is the same computation.
    net = PerceptionNet(in_channels=1, width=8).eval()
    return net.to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]


def _frames(t: int = 6, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.rand(t, 1, size, size, generator=g)


def _block_outputs(net: PerceptionNet, frame: torch.Tensor) -> list[torch.Tensor]:
    outs, h = [], frame[None]
    for block in net.backbone:
        h = block(h)
        outs.append(h)
    return outs


def _pass_outputs(pm: PassModel) -> list[torch.Tensor]:
    blocks = pm.patch_blocks
    return [b.input_view for b in blocks[1:]] + [pm._final]


# -- geometry and patch ops -------------------------------------------------------------
def test_plan_sums_the_halo_of_a_block() -> None:
    conv = LayerSpec("conv", 3, 1, 1, 4, 4)
    plan = plan_block([conv, LayerSpec("pointwise"), conv], out_patch=8)
    assert (plan.in_window, plan.in_halo, plan.in_patch) == (12, 2, 8)
    assert [lp.out_window for lp in plan.layers] == [10, 10, 8]
    assert plan.patch_macs() == 4 * 4 * 9 * (10 * 10 + 8 * 8)
    pooled = plan_block([LayerSpec("pool", 2, 2), conv], out_patch=4)
    assert (pooled.in_patch, pooled.in_window, pooled.in_halo, pooled.stride) == (8, 12, 2, 2)


def test_gather_and_put_agree_with_slicing() -> None:
    x = torch.randn(1, 3, 16, 16)
    cells = torch.tensor([2, 4, 15])  # (0, 2), (1, 0), (3, 3) on a 4x4 grid
    padded = pad_map(x, 4, 8, 2)
    table = window_table((4, 4), 4, 8, 0, padded.shape[3])
    w = gather_cells(padded, table, cells, 8)
    assert w.is_contiguous(memory_format=torch.channels_last)
    for k, (i, j) in enumerate([(0, 2), (1, 0), (3, 3)]):
        assert torch.equal(w[k], padded[0, :, 4 * i : 4 * i + 8, 4 * j : 4 * j + 8])
    bare = gather_cells(padded, window_table((4, 4), 4, 4, 2, padded.shape[3]), cells, 4)
    assert torch.equal(bare[1], x[0, :, 4:8, 0:4])
    buf = to_pixel_major(torch.zeros(1, 3, 18, 18))  # a bordered buffer, border 1
    put_table = window_table((4, 4), 4, 4, 1, 18)
    put_cells(buf, put_table, cells, bare)
    workspace = torch.empty(100, 3)
    assert torch.equal(gather_cells(buf, put_table, cells, 4, workspace), bare)
    assert float(buf.abs().sum()) == pytest.approx(float(bare.abs().sum()))
    assert torch.equal(buf[0, :, 13:17, 13:17], x[0, :, 12:16, 12:16])


def test_mask_table_marks_the_outside_of_border_windows() -> None:
    masks, border = mask_table((3, 3), 4, 8, 2, 12, 12)
    assert border.tolist() == [True] * 4 + [False] + [True] * 4
    centre, corner = masks[4, 0], masks[0, 0]
    assert bool((centre == 1).all())
    assert corner[:2].sum() == 0 and corner[:, :2].sum() == 0 and corner[2:, 2:].min() == 1


def test_neighbour_max_matches_max_pool_on_non_negative_grids() -> None:
    x = torch.rand(2, 3, 5, 7)
    for r in (1, 2):
        want = nn.functional.max_pool2d(x, 2 * r + 1, stride=1, padding=r)
        assert torch.equal(neighbour_max(x, r), want)


def test_strided_max_pool_matches_max_pool() -> None:
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(StridedMaxPool2d(2)(x), nn.functional.max_pool2d(x, 2))
    assert torch.equal(StridedMaxPool2d(3)(x), nn.functional.max_pool2d(x, 3))


# -- exactness --------------------------------------------------------------------------
def test_computing_every_patch_reproduces_the_full_model() -> None:
    net, frames = _net(), _frames()
    pm = prepare(net, patch=8, threshold=-1.0, keyframe_every=0)  # tau < 0: compute all
    for t in range(len(frames)):
        out = pm(frames[t])
        with torch.no_grad():
            ref = _block_outputs(net, frames[t])
            assert torch.allclose(out, net(frames[t : t + 1]), atol=1e-6, rtol=0)
        for got, want in zip(_pass_outputs(pm), ref, strict=True):
            assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert pm.keyframes == 1 and pm.executed_patches == pm.total_patches


def test_border_masking_for_a_strided_block_with_batch_norm() -> None:
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(2)
    assert bn.running_mean is not None
    bn.running_mean.uniform_(-1, 1)
    bn.bias.data.uniform_(0.5, 1.0)  # zero input would give non-zero output: must be masked
    block = nn.Sequential(
        bn, nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)
    ).eval()
    pm = prepare(block, patch=8, threshold=-1.0)
    x = torch.randn(3, 2, 24, 24)
    for t in range(3):
        out = pm(x[t])
        with torch.no_grad():
            assert torch.allclose(out, block(x[t : t + 1]), atol=1e-5, rtol=0)


def test_dense_fallback_runs_the_whole_block_exactly() -> None:
    net, frames = _net(), _frames(3)
    pm = prepare(net, patch=8, threshold=-1.0, dense_above=0.5)  # every patch chosen
    patch_calls: list[int] = []
    for m in pm.modules():
        if isinstance(m, PatchConv):
            m.register_forward_hook(lambda _m, inp, _o: patch_calls.append(1))
    for t in range(3):
        out = pm(frames[t])
        with torch.no_grad():
            assert torch.allclose(out, net(frames[t : t + 1]), atol=1e-6, rtol=0)
    assert patch_calls == []
    assert pm.executed_macs == pm.full_macs + pm.gate_macs


def test_unchanged_frame_is_reused_exactly_and_nothing_runs() -> None:
    net, frames = _net(), _frames()
    pm = prepare(net, patch=8, threshold=0.0)
    calls: list[int] = []
    for m in pm.modules():
        if isinstance(m, PatchConv):
            m.register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].shape[0]))
    first = pm(frames[0])
    again = pm(frames[0])
    assert torch.equal(first, again)
    with torch.no_grad():
        assert torch.equal(again, net(frames[:1]))
    assert calls == []
    assert pm.executed_patches == pm.total_patches // 2  # only the key frame computed


def test_computed_patches_equal_full_computation_and_skipped_ones_keep_the_cache() -> None:
    torch.manual_seed(4)
    block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    block.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    pm = prepare(block, patch=8, threshold=0.0, halo_aware=False)
    a = torch.rand(1, 32, 32)
    b = a.clone()
    b[:, 9:14, 18:30] += 0.5  # touches patches (1, 2) and (1, 3)
    pm(a)
    out = pm(b)
    with torch.no_grad():
        full_a, full_b = block(a[None]), block(b[None])
    computed = torch.zeros(4, 4, dtype=torch.bool)
    computed[1, 2] = computed[1, 3] = True
    for i in range(4):
        for j in range(4):
            sl = (..., slice(8 * i, 8 * i + 8), slice(8 * j, 8 * j + 8))
            want = full_b if computed[i, j] else full_a
            if computed[i, j]:
                assert torch.allclose(out[sl], want[sl], atol=1e-6, rtol=0), (i, j)
            else:
                assert torch.equal(out[sl], want[sl]), (i, j)
    assert pm.patch_blocks[0].executed_patches == 16 + 2
    assert pm.patch_blocks[0].executed_macs == (
        pm.patch_blocks[0].full_macs_per_frame
        + pm.patch_blocks[0].gate_macs
        + 2 * pm.patch_blocks[0].plan.patch_macs()
    )
    assert pm.patch_blocks[0].gate_macs == 32 * 32  # one pass over the 1-channel input


def _walking_square(t: int = 10) -> torch.Tensor:
    frames = _frames(1, size=64).repeat(t, 1, 1, 1)
    for k in range(1, t):  # a 6x6 square walks right and down; the rest is still
        frames[k, :, 4 + k : 10 + k, 2 * k : 2 * k + 6] = 1.0
    return frames


def test_halo_aware_threshold_zero_is_exact_on_a_moving_object() -> None:
    net, frames = _net(), _walking_square()
    exact = prepare(net, patch=8, threshold=0.0, keyframe_every=0)
    literal = prepare(net, patch=8, threshold=0.0, keyframe_every=0, halo_aware=False)
    errors = []
    for t in range(len(frames)):
        with torch.no_grad():
            ref = _block_outputs(net, frames[t])
        exact(frames[t])
        literal(frames[t])
        for got, want in zip(_pass_outputs(exact), ref, strict=True):
            assert torch.allclose(got, want, atol=1e-5, rtol=0)
        stale = zip(_pass_outputs(literal), ref, strict=True)
        errors.append(max(float((g - w).abs().max()) for g, w in stale))
    assert exact.executed_patches < 0.4 * exact.total_patches  # and still skips
    assert max(errors) > 1e-3  # the patch-only gate leaves stale halo bands


def test_skipped_work_is_not_executed() -> None:
    net, frames = _net(), _walking_square(8)
    pm = prepare(net, patch=8, threshold=1e-4, keyframe_every=0)
    pm(frames[0])  # the key frame
    patch_batches: dict[int, list[int]] = defaultdict(list)
    full_calls: list[int] = []
    for b, block in enumerate(pm.patch_blocks):
        first = next(m for m in block.patch_layers if isinstance(m, PatchConv))
        first.register_forward_hook(
            lambda _m, inp, _o, b=b: patch_batches[b].append(int(inp[0].shape[0]))
        )
        for conv in block.block:  # the whole-map convolutions (ReLU/pool are shared)
            if isinstance(conv, nn.Conv2d):
                conv.register_forward_hook(lambda _m, _i, _o: full_calls.append(1))
    for t in range(1, 8):
        pm(frames[t])
    assert full_calls == []  # the whole-map layers never run on gated frames
    for b, blk in enumerate(pm.patch_blocks):
        cells = blk.grid[0] * blk.grid[1]
        gated = blk.executed_patches - cells
        assert sum(patch_batches[b]) == gated
        assert 0 < gated < 7 * cells / 3
        assert blk.executed_macs == (
            blk.full_macs_per_frame + blk.gate_macs + gated * blk.plan.patch_macs()
        )
    stats = pm.stats()
    assert stats["executed_macs"] < 0.5 * stats["full_macs"]
    assert stats["frames"] == 8 and stats["keyframes"] == 1


def test_key_frames_reset_the_cache() -> None:
    net, frames = _net(), _frames(9)
    pm = prepare(net, patch=8, threshold=1e9, keyframe_every=4)  # never compute a patch
    outs = [pm(frames[t]) for t in range(9)]
    with torch.no_grad():
        full = [net(frames[t : t + 1]) for t in range(9)]
    for t in range(9):
        if t % 4 == 0:
            assert torch.equal(outs[t], full[t])
        else:  # stale: the cache of the last key frame
            assert torch.equal(outs[t], outs[t - t % 4])
            assert not torch.allclose(outs[t], full[t])
    assert pm.keyframes == 3
    pm.reset()
    assert torch.equal(pm(frames[5]), full[5])
    assert pm.keyframes == 4
    pm.reset_stats()
    assert pm.stats()["executed_macs"] == 0


def test_clip_path_matches_the_frame_path() -> None:
    net = _net()
    frames = _frames(1).repeat(6, 1, 1, 1)
    for t in range(6):
        frames[t, :, 20:28, 2 * t : 2 * t + 8] = 0.9
    pm = prepare(net, patch=8, threshold=0.01, keyframe_every=4)
    seq = torch.cat([pm(frames[t]) for t in range(6)])
    with torch.no_grad():
        clip, compute = pm.forward_clip(frames[None])
    assert torch.allclose(clip[0], seq, atol=1e-5)
    assert 0.0 < float(compute) < 1.0


# -- the learned gate ------------------------------------------------------------------
def test_gumbel_gate_is_binary_with_a_gradient() -> None:
    logits = torch.zeros(1, 1, 4, 4, requires_grad=True)
    g = gumbel_gate(logits)
    values = g.detach()
    assert torch.allclose(values, values.round(), atol=1e-6)
    g.sum().backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_learned_gate_trains_towards_skipping() -> None:
    net = _net()
    frames = _frames(1).repeat(6, 1, 1, 1)
    clips = frames[None].repeat(4, 1, 1, 1, 1)
    labels = torch.zeros(4, 6, dtype=torch.long)
    pm = prepare(net, patch=8, gate="learned", keyframe_every=0, learned_prior=False)
    untrained = pm(frames[0]), pm(frames[1])
    with torch.no_grad():
        assert torch.allclose(untrained[1], net(frames[:1]), atol=1e-6)  # init: compute all
    before = [p.clone() for p in pm.parameters()]
    history = train_gates(pm, clips, labels, steps=30, batch_size=2, lr=0.05, sparsity=5.0)
    assert history[-1]["compute"] < history[0]["compute"]
    gate_params = {id(p) for b in pm.patch_blocks for p in b.gate.parameters()}
    for p, q in zip(pm.parameters(), before, strict=True):
        assert torch.equal(p, q) != (id(p) in gate_params)  # only the gates moved


def test_learned_gate_with_prior_starts_as_the_halo_aware_threshold_gate() -> None:
    net, frames = _net(), _walking_square()
    learned = prepare(net, patch=8, gate="learned", threshold=0.01, keyframe_every=0)
    threshold = prepare(net, patch=8, gate="threshold", threshold=0.01, keyframe_every=0)
    for t in range(len(frames)):
        assert torch.equal(learned(frames[t]), threshold(frames[t]))
    assert learned.executed_patches == threshold.executed_patches < threshold.total_patches


# -- errors ------------------------------------------------------------------------------
def test_prepare_rejects_what_it_cannot_cut() -> None:
    with pytest.raises(ConfigError, match="cannot prepare"):
        prepare(nn.LSTM(4, 4))
    with pytest.raises(ConfigError, match="cannot cut"):
        prepare(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Upsample(scale_factor=2)))
    with pytest.raises(ConfigError, match="dilation"):
        prepare(nn.Conv2d(1, 2, 3, padding=2, dilation=2))
    with pytest.raises(ConfigError, match="padding=0"):
        prepare(nn.Sequential(nn.MaxPool2d(3, 2, padding=1)))
    with pytest.raises(ConfigError, match="not a multiple of"):
        prepare(_net(), patch=6)
    with pytest.raises(ConfigError, match="gate"):
        prepare(_net(), gate="magic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="keyframe_every"):
        prepare(_net(), keyframe_every=-1)


def test_frame_size_must_fit_the_patch_grid() -> None:
    pm = prepare(_net(), patch=8)
    with pytest.raises(DataError, match="multiple of the patch"):
        pm(torch.rand(1, 36, 36))
    with pytest.raises(DataError, match="one frame"):
        pm(torch.rand(2, 1, 32, 32))


def test_cell_major_gate_path_matches_the_grid_path() -> None:
    from clients.pass_skip import LearnedGate, ThresholdGate
    from clients.pass_skip.gates import neighbour_max_rows, neighbour_table

    g = torch.Generator().manual_seed(5)
    grid = torch.rand(1, 4, 5, 7, generator=g)
    rows = grid.reshape(4, -1).t().contiguous()
    for r in (1, 2):
        want = neighbour_max(grid, r).reshape(4, -1).t()
        assert torch.equal(neighbour_max_rows(rows, neighbour_table((5, 7), r)), want)
    x, prev = torch.rand(1, 3, 20, 28, generator=g), torch.rand(1, 3, 20, 28, generator=g)
    learned = LearnedGate(3, 4, hidden=6, prior_tau=0.3, prior_scale=5.0, reach=1)
    for gate in (learned, ThresholdGate(4, 0.3, reach=1)):
        for p in gate.parameters():
            nn.init.normal_(p, generator=g)
        with torch.no_grad():
            want = gate(x, prev).reshape(-1)
            got = gate.decide_table(gate.table(x, prev), (5, 7))
        assert torch.allclose(got, want, atol=1e-5)


def test_fast_decisions_match_the_logits_of_the_reference_path() -> None:
    from clients.pass_skip import LearnedGate, ThresholdGate
    from clients.pass_skip.gates import neighbour_max_cells, neighbour_max_rows, neighbour_table

    g = torch.Generator().manual_seed(6)
    rows = torch.rand(35, 4, generator=g)
    for r in (0, 1, 2):
        want = neighbour_max_rows(rows, neighbour_table((5, 7), r)) if r else rows
        assert torch.equal(neighbour_max_cells(rows, (5, 7), r), want)
    x = torch.rand(1, 3, 20, 28, generator=g)
    prev = x + 0.6 * torch.rand(1, 3, 20, 28, generator=g)  # change about the threshold
    prev[..., :8, :] = x[..., :8, :]  # unchanged patches too
    gates = [
        LearnedGate(3, 4, hidden=6, prior_tau=0.3, prior_scale=5.0, reach=r) for r in (0, 1, 2)
    ] + [LearnedGate(3, 4, hidden=6), ThresholdGate(4, 0.3, reach=1)]
    for gate in gates:
        for p in gate.parameters():
            nn.init.normal_(p, generator=g)
        with torch.no_grad():
            if isinstance(gate, LearnedGate):  # centre the logits: both decisions occur
                gate.out.bias -= gate(x, prev).median()
            table, f = gate.table(x, prev), gate.cell_features(x, prev)
            assert torch.allclose(table, f.reshape(f.shape[1], -1).t())
            logits = gate(x, prev).reshape(-1)  # the grid (training) path
            assert torch.allclose(gate.decide_table(table, (5, 7)), logits, atol=1e-5)
            cells = gate.decide_cells(table, (5, 7))
        clear = logits.abs() > 1e-4  # a tie may round either way
        chosen = torch.zeros(35, dtype=torch.bool)
        chosen[cells] = True
        assert torch.equal(chosen[clear], (logits > 0)[clear])
        assert 0 < len(cells) < 35


def test_learned_frame_path_matches_the_clip_path() -> None:
    net, frames = _net(), _walking_square(9)
    pm = prepare(net, patch=8, gate="learned", threshold=0.01, keyframe_every=5)
    g = torch.Generator().manual_seed(7)
    for block in pm.patch_blocks:  # a residual that overturns the prior in places
        for p in block.gate.parameters():
            nn.init.normal_(p, std=0.5, generator=g)
    seq = torch.cat([pm(frames[t]) for t in range(len(frames))])
    with torch.no_grad():
        clip, _ = pm.forward_clip(frames[None])
    assert torch.allclose(clip[0], seq, atol=1e-5)
    prior = prepare(net, patch=8, gate="threshold", threshold=0.01, keyframe_every=5)
    for t in range(len(frames)):
        prior(frames[t])
    gated = [b.executed_patches - 2 * b.grid[0] * b.grid[1] for b in pm.patch_blocks]
    assert 0 < sum(gated) < 7 * sum(b.grid[0] * b.grid[1] for b in pm.patch_blocks)
    # The residual overturned the prior somewhere (so the learned part was exercised).
    assert gated != [b.executed_patches - 2 * b.grid[0] * b.grid[1] for b in prior.patch_blocks]


def test_learned_gate_follows_changes_of_its_weights() -> None:
    from clients.pass_skip import LearnedGate

    g = torch.Generator().manual_seed(8)
    table = torch.rand(35, 9, generator=g) * 0.05
    gate = LearnedGate(3, 4, hidden=6, prior_tau=0.02, prior_scale=5.0, reach=1)
    for p in gate.parameters():
        nn.init.normal_(p, generator=g)
    with torch.inference_mode():
        assert len(gate.decide_cells(table, (5, 7))) > 0
    state = gate.state_dict()
    state["out.bias"] = torch.full((1,), -50.0)
    gate.load_state_dict(state)  # the residual now says skip everywhere
    with torch.inference_mode():
        assert len(gate.decide_cells(table, (5, 7))) == 0
    with torch.no_grad():
        gate.out.bias.add_(100.0)  # in place, as an optimizer step: compute everywhere
    with torch.inference_mode():
        assert len(gate.decide_cells(table, (5, 7))) == 35
