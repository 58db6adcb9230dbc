"""Device check: the grouped GEMM custom op against a float64 reference, on whatever device is present."""

from __future__ import annotations

import torch

from lancet.moe.experts import grouped_mm, grouped_mm_dw, native_grouped_mm_supported


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    sizes = [37, 0, 130, 64]
    x = torch.randn(sum(sizes), 768, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(len(sizes), 768, 3072, device=device, dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    print("native grouped_mm used:", native_grouped_mm_supported(x, w))
    out = grouped_mm(x, w, offsets)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref_out, ref_dx, ref_dw = [], torch.zeros_like(x, dtype=torch.float64), torch.zeros_like(w, dtype=torch.float64)
    start = 0
    for g, n in enumerate(sizes):
        xs, ws, dys = x[start : start + n].double(), w[g].double(), dy[start : start + n].double()
        ref_out.append(xs @ ws)
        ref_dx[start : start + n] = dys @ ws.t()
        ref_dw[g] = xs.t() @ dys
        start += n
    ref_out = torch.cat(ref_out)
    for name, got, ref in (("out", out, ref_out), ("dx", x.grad, ref_dx), ("dw", w.grad, ref_dw)):
        err = (got.double() - ref).norm() / ref.norm()
        print(f"{name}: relative error {err:.2e}")
        assert err < 1e-2, name
    dw_direct = grouped_mm_dw(x.detach(), dy, offsets)
    assert torch.equal(dw_direct, w.grad)
    print("grouped GEMM check passed")




def check_bias() -> None:
    from lancet.moe.experts import group_bias, segment_sum

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = [300, 0, 1200]
    offsets = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    groups = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(sizes, device=device))
    bias = torch.randn(3, 3072, device=device, dtype=torch.bfloat16, requires_grad=True)
    rows = group_bias(bias, groups, offsets)
    dy = torch.randn_like(rows)
    rows.backward(dy)
    ref = torch.zeros(3, 3072, dtype=torch.float64, device=device).index_add_(0, groups, dy.double())
    err = (bias.grad.double() - ref).norm() / ref.norm()
    print(f"segment_sum relative error {err:.2e}")
    assert err < 1e-2
    assert torch.equal(segment_sum(dy, offsets), bias.grad)
    print("bias check passed")


if __name__ == "__main__":
    main()
    check_bias()
