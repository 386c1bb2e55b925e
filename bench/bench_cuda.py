"""hetmerge's CUDA kernels vs torch on the same device, with the device's rooflines.

    python bench/bench_cuda.py --device cuda [--size 8192] [--k 8] [--repeat 20]

Data movement (permute_pad, interpolate, weighted_sum): ours vs the fastest plain torch code (padded
gather = zero-bordered buffer + two index_selects; interpolate = that + ONE broadcast torch.lerp;
weighted_sum = ONE torch.mm on the pre-stacked models), both sides writing out= into the same buffers,
as achieved bandwidth and as a fraction of the device's copy bandwidth (a device-to-device copy
measured here; the theoretical peak is printed too when torch reports the memory clock and bus).
cost_matrix: ours (fp32 SIMT, tf32/bf16 tensor cores) vs cuBLAS on pre-gathered operands and vs
gather + cuBLAS, as TFLOP/s and ratios. Targets (docs/cuda.md): data movement >= 80% of copy
bandwidth; fp32 cost_matrix within 1.2x of cuBLAS on pre-gathered operands, faster than gather +
cuBLAS. On a machine without a CUDA device it says so and exits 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=8192, help="width of the square weight matrices")
    ap.add_argument("--k", type=int, default=8, help="number of lambdas / coefficient rows")
    ap.add_argument("--cost-size", type=int, default=4096, help="n_a = n_b = inner size of cost_matrix")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()

    import torch

    import hetmerge
    from hetmerge import _backend, ops
    from hetmerge.benchmarks.data_movement import TorchPermutePad

    if not args.device.startswith("cuda"):
        print(f"bench_cuda: --device must be a CUDA device, got {args.device!r}")
        return 2
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device is visible to torch on this machine; nothing to measure.")
        return 0
    if not hetmerge.cuda_available():
        print(f"bench_cuda: hetmerge's CUDA backend is unusable here: {_backend.cuda_status()}")
        return 0

    dev = torch.device(args.device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(dev)
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def timed(fn):
        """Median milliseconds of fn() over --repeat runs after warm-up, with CUDA events."""
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    # ---- rooflines --------------------------------------------------------------------------
    big = torch.empty(1 << 28, dtype=torch.uint8, device=dev)  # 256 MiB
    dst = torch.empty_like(big)
    copy_ms = timed(lambda: dst.copy_(big))
    copy_gbs = 2 * big.numel() / copy_ms / 1e6
    del big, dst
    peak = ""
    clock = getattr(props, "memory_clock_rate", None)
    bus = getattr(props, "memory_bus_width", None)
    if clock and bus:
        peak = f", theoretical {2 * clock * 1e3 * bus / 8 / 1e9:.0f} GB/s"
    n = args.cost_size
    x, y = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    fp32_tflops = 2 * n**3 / timed(lambda: x @ y.T) / 1e9
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32_tflops = 2 * n**3 / timed(lambda: x @ y.T) / 1e9
    torch.backends.cuda.matmul.allow_tf32 = False
    xb, yb = x.bfloat16(), y.bfloat16()
    bf16_tflops = 2 * n**3 / timed(lambda: xb @ yb.T) / 1e9
    del x, y, xb, yb
    print(f"device: {props.name}, {props.multi_processor_count} SMs, hetmerge CUDA runtime "
          f"{_backend._cuda.runtime_version()}; both sides on the same device and stream (host threads "
          f"only launch: hetmerge {hetmerge.get_num_threads()}, torch {torch.get_num_threads()})")
    print(f"rooflines: copy bandwidth {copy_gbs:.0f} GB/s{peak}; cuBLAS {n}^3: fp32 {fp32_tflops:.1f}, "
          f"tf32 {tf32_tflops:.1f}, bf16 {bf16_tflops:.1f} TFLOP/s")
    print()
    print(f"{'case':44s} {'ours ms':>9s} {'torch ms':>9s} {'ours/torch':>10s} {'ours GB/s':>10s} {'% copy':>7s}")

    def row(name, ours_ms, torch_ms, nbytes):
        gbs = nbytes / ours_ms / 1e6
        print(f"{name:44s} {ours_ms:9.3f} {torch_ms:9.3f} {ours_ms / torch_ms:10.2f} {gbs:10.0f} "
              f"{100 * gbs / copy_gbs:6.0f}%")

    def padded_map(n_slots, n_source):
        m = torch.randperm(n_source, device=dev, generator=gen)[:n_slots]
        full = torch.full((n_slots,), -1, dtype=torch.int64, device=dev)
        full[: len(m)] = m
        return full[torch.randperm(n_slots, device=dev, generator=gen)]

    s, K = args.size, args.k
    for dtype in (torch.float32, torch.bfloat16):
        es = torch.finfo(dtype).bits // 8
        w = torch.randn(s, s, device=dev, generator=gen).to(dtype)
        b = torch.randn(s - 64, s - 64, device=dev, generator=gen).to(dtype)
        rows, cols = padded_map(s, s - 64), padded_map(s, s - 64)
        perm = torch.randperm(s, device=dev, generator=gen)
        tag = str(dtype).replace("torch.", "")
        # permute_pad: bytes = read w (gathered) + write out; both sides write into `out`
        out = torch.empty(s, s, device=dev, dtype=dtype)
        row(f"permute_pad rows only {s}x{s} {tag}", timed(lambda: ops.permute_pad(w, perm, out=out)),
            timed(lambda: torch.index_select(w, 0, perm, out=out)), 2 * s * s * es)
        ref_pp = TorchPermutePad(b, rows, cols)
        row(f"permute_pad rows+cols padded {s}x{s} {tag}", timed(lambda: ops.permute_pad(b, rows, cols, out=out)),
            timed(lambda: ref_pp(b, out)), 2 * s * s * es)
        lam = torch.linspace(0, 1, K, device=dev)
        lam_list = lam.tolist()
        lam_k = lam.to(dtype).view(K, 1, 1)
        outk = torch.empty(K, s, s, device=dev, dtype=dtype)

        def torch_interp():
            ref_pp(b, out)
            return torch.lerp(w.unsqueeze(0), out.unsqueeze(0), lam_k, out=outk)
        row(f"interpolate K={K} padded {s}x{s} {tag}",
            timed(lambda: ops.interpolate(w, b, lam_list, rows, cols, out=outk)), timed(torch_interp),
            (2 + K) * s * s * es)
        xs = [torch.randn(s, s, device=dev, generator=gen).to(dtype) for _ in range(4)]
        coeffs = torch.rand(K, 4, device=dev, generator=gen)
        coeffs_t = coeffs.to(dtype)
        stacked = torch.stack(xs).view(4, -1)     # stacked beforehand, not timed: a head start for torch
        row(f"weighted_sum T=4 K={K} {s}x{s} {tag}", timed(lambda: ops.weighted_sum(xs, coeffs, out=outk)),
            timed(lambda: torch.mm(coeffs_t, stacked, out=outk.view(K, -1))), (4 + K) * s * s * es)
        del w, b, xs, stacked, out, outk, ref_pp

    # ---- cost_matrix ------------------------------------------------------------------------
    print()
    print(f"{'cost_matrix n=k=' + str(n):44s} {'ms':>9s} {'TFLOP/s':>9s} {'vs cuBLAS pre-gathered':>23s} "
          f"{'vs gather+cuBLAS':>17s}")
    A = torch.randn(n, n, device=dev, generator=gen)
    B = torch.randn(n, n + 256, device=dev, generator=gen)
    m = padded_map(n, n + 256)
    keep = m >= 0
    a_g, b_g = A[:, keep].contiguous(), B[:, m[keep]].contiguous()
    flops = 2 * n * n * int(keep.sum())
    cublas_ms = timed(lambda: a_g @ b_g.T)
    gather_ms = timed(lambda: A[:, keep] @ B[:, m[keep]].T)
    print(f"{'cuBLAS fp32 on pre-gathered operands':44s} {cublas_ms:9.3f} {flops / cublas_ms / 1e9:9.1f}")
    print(f"{'gather + cuBLAS fp32':44s} {gather_ms:9.3f} {flops / gather_ms / 1e9:9.1f}")
    out = torch.empty(n, n, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    for precision in ("fp32", "tf32", "bf16", "fp16"):
        ms = timed(lambda: _backend._cuda.cost_matrix([(A, B, m, 1)], out, stream=stream, precision=precision))
        print(f"{'ours ' + precision:44s} {ms:9.3f} {flops / ms / 1e9:9.1f} {ms / cublas_ms:22.2f}x "
              f"{ms / gather_ms:16.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
