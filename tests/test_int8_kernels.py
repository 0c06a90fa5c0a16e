"""The private-op wrappers of clients.int8._kernels: exactness, overflow, odd shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clients.int8 import _kernels as K

needs_onednn = pytest.mark.skipif(
    not K.onednn_conv_available(), reason="oneDNN int8 convolution unavailable"
)


def test_onednn_schema_is_the_expected_one() -> None:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no mkldnn")
    assert K.check_onednn_schema() == []


@pytest.mark.parametrize("mkn", [(1, 1, 1), (3, 5, 7), (17, 9, 7), (33, 17, 65), (8, 64, 1)])
def test_int_mm_odd_shapes_exact(mkn: tuple[int, int, int]) -> None:
    m, k, n = mkn
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    ref = a.double() @ b.double()
    assert torch.equal(K.int_mm(a, b).double(), ref)
    assert torch.equal(K.int_mm(a, b.t().contiguous().t()).double(), ref)


@pytest.mark.parametrize("mn", [(1, 1), (1, 3), (3, 1)])
def test_int_mm_transposed_size1_operands(mn: tuple[int, int]) -> None:
    # torch's own _int_mm is wrong for (K, 1).t() at this K; the wrapper must not be.
    m, n = mn
    k = 20_000
    a = torch.full((k, m), 127, dtype=torch.int8).t()
    b = torch.full((n, k), 127, dtype=torch.int8).t()
    ref = torch.full((m, n), 127.0 * 127 * k, dtype=torch.float64)
    assert torch.equal(K.int_mm(a, b).double(), ref)
    assert torch.equal(K.int_mm(a.contiguous(), b.contiguous()).double(), ref)


def test_int_mm_does_not_overflow_at_large_k() -> None:
    k = 200_000
    torch.manual_seed(0)
    a = torch.full((2, k), 127, dtype=torch.int8)
    a[1] = torch.randint(-127, 128, (k,), dtype=torch.int8)
    b = torch.full((k, 3), 127, dtype=torch.int8)
    b[:, 1] = -127
    b[:, 2] = torch.randint(-127, 128, (k,), dtype=torch.int8)
    ref = a.double() @ b.double()
    assert abs(float(ref[0, 0])) > 2**31  # the single-call int32 result would wrap
    got = K.int_mm(a, b).double()
    assert torch.allclose(got, ref, rtol=1e-6, atol=64)
    got_scaled = K.int_mm_scaled(a, b, torch.tensor(0.5)).double()
    assert torch.allclose(got_scaled, ref * 0.5, rtol=1e-6, atol=64)


CASES = [
    ((2, 4, 9, 9), (6, 4, 3, 3), 1, 1, 1, 1),
    ((2, 4, 9, 9), (6, 4, 3, 3), 2, 1, 1, 1),
    ((2, 4, 10, 11), (6, 2, 3, 3), 2, 0, 2, 2),
    ((3, 8, 7, 7), (8, 1, 3, 3), 1, 1, 1, 8),
    ((2, 3, 8, 8), (4, 3, 5, 5), 3, 2, 1, 1),
    ((2, 4, 5, 5), (4, 4, 3, 3), 1, 3, 1, 1),  # padding > dilation * (k - 1)
    ((2, 72, 6, 6), (8, 72, 3, 3), 1, 1, 1, 1),  # many channels: per-offset GEMMs for dW
]


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_conv_kernels_exact(case: tuple, onednn: bool) -> None:
    if onednn and not K.onednn_conv_available():
        pytest.skip("oneDNN int8 convolution unavailable")
    xs, ws, s, p, d, g = case
    torch.manual_seed(0)
    x = torch.randint(-127, 128, xs, dtype=torch.int8)
    w = torch.randint(-127, 128, ws, dtype=torch.int8)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    y = F.conv2d(xf, wf, None, s, p, d, g)
    gq = torch.randint(-127, 128, y.shape, dtype=torch.int8)
    y.backward(gq.float())
    geo = ((s, s), (p, p), (d, d), g)
    ones = torch.ones(ws[0])
    if onednn:
        out = K.qconv2d(K.to_u8(x), 0.5, w, ones, None, *geo)
        dx = K.qconv2d_input_grad(K.to_u8(gq), 0.5, w, xs[2:], *geo)
        dw = K.qconv2d_weight_grad(K.to_u8(x), 0.5, gq, 2.0, ws[2:], *geo)
    else:
        out = K.im2col_conv2d(x, 0.5, w, ones, None, *geo)
        dx = K.im2col_conv2d_input_grad(gq, 0.5, w, xs[2:], *geo)
        dw = K.im2col_conv2d_weight_grad(x, 0.5, gq, 2.0, ws[2:], *geo)
    assert torch.equal(out, y.detach() * 0.5)
    assert torch.equal(dx, xf.grad * 0.5)  # type: ignore[operator]
    assert torch.equal(dw, wf.grad)


@needs_onednn
def test_conv_weight_grad_does_not_overflow() -> None:
    # dW's inner dimension is N*Ho*Wo = 6 * 150 * 150 = 135,000 products of 127*127.
    x = torch.full((6, 1, 150, 150), 127, dtype=torch.int8)
    g = torch.full((6, 1, 150, 150), 127, dtype=torch.int8)
    ref = 127.0 * 127.0 * 6 * 150 * 150
    assert ref > 2**31
    dw = K.qconv2d_weight_grad(K.to_u8(x), 1.0, g, 1.0, (1, 1), (1, 1), (0, 0), (1, 1), 1)
    assert abs(float(dw.flatten()[0]) - ref) / ref < 1e-6
    dw2 = K.im2col_conv2d_weight_grad(x, 1.0, g, 1.0, (1, 1), (1, 1), (0, 0), (1, 1), 1)
    assert abs(float(dw2.flatten()[0]) - ref) / ref < 1e-6
