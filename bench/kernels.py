"""Kernel benchmarks: one JSON line per (op, backend, shape); `impl` names the entry of the op's table
in kernels/dispatch.py (reference, cpu, triton), plus baselines.

    python bench/kernels.py            # CUDA: DeepSeek-V3.2 shapes, L = 8k..64k; CPU: up to the bench model's 16k
    python bench/kernels.py --quick    # a fast CPU run (seconds)

On CUDA: TFLOP/s counting only the selected keys (sparse fwd 2*T*K*H*(Dqk+d_v); bwd per token
2*H*K*(2*d_v + 3*Dqk), DSA.md 6.3; indexer 2*visible_pairs*H_I*D_I), and GB/s from the bytes each
kernel must move at least (gathered kv rows, q, out, scores). Baselines: torch SDPA dense causal
attention at the same L in MLA's MHA form (128 heads, qk 192, v 128), plain torch.topk, and the
torch reference where its memory allows. On CPU: each op's reference against its CPU backend (the C
kernels, built on first use; the matmul-tiled indexer scores), up to the bench model's 16k-token layer.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from dsarl.kernels import dispatch


def timeit(fn, reps: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def emit(**row):
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def causal_indices(B, T, S, K, device):
    """Random causal selections: K distinct-ish keys among each query's prefix, -1 beyond it."""
    t = torch.arange(S - T, S, device=device)[None, :, None]  # [1, T, 1]
    idx = (torch.rand(B, T, K, device=device) * (t + 1)).long()  # [B, T, K]
    return idx.masked_fill(torch.arange(K, device=device)[None, None, :] > t, -1).to(torch.int32)


def triton_blocks(impl: str) -> dict:
    """The (BH, BK, num_stages) each Triton sparse MLA kernel ran with: the first that fit (triton.py's _launch)."""
    if impl != "triton":
        return {}
    from dsarl.kernels.sparse_mla import triton as sparse_triton

    return {"blocks": {key[0].strip("_").replace("_kernel", ""): list(fit)
                       for key, fit in sparse_triton._FITTING.items()}}


def sparse_flops(T, K, H, Dqk, d_v):
    return 2 * T * K * H * (Dqk + d_v), 2 * T * H * K * (2 * d_v + 3 * Dqk)


def bench_sparse(impls, B, T, S, H, Dqk, d_v, K, dtype, device, reps):
    q = torch.randn(B, T, H, Dqk, device=device, dtype=dtype, requires_grad=True)
    kv = torch.randn(B, S, Dqk, device=device, dtype=dtype, requires_grad=True)
    idx = causal_indices(B, T, S, K, device)
    do = torch.randn(B, T, H, d_v, device=device, dtype=dtype)
    f_fwd, f_bwd = sparse_flops(B * T, K, H, Dqk, d_v)
    esize = torch.finfo(dtype).bits // 8
    fwd_bytes = esize * B * T * (K * Dqk + H * Dqk + H * d_v)  # gathered rows + q + out
    for name, fn in impls.items():
        def fwd():
            with torch.no_grad():
                fn(q, kv, idx, Dqk ** -0.5, d_v)

        def fwd_bwd():
            out, _ = fn(q, kv, idx, Dqk ** -0.5, d_v)
            torch.autograd.grad(out, (q, kv), do)

        t_f = timeit(fwd, reps)
        t_fb = timeit(fwd_bwd, reps)
        t_b = max(t_fb - t_f, 1e-9)
        emit(op="sparse_mla", impl=name, B=B, T=T, S=S, H=H, Dqk=Dqk, d_v=d_v, K=K, dtype=str(dtype)[6:],
             fwd_ms=1e3 * t_f, bwd_ms=1e3 * t_b, fwd_tflops=f_fwd / t_f / 1e12, bwd_tflops=f_bwd / t_b / 1e12,
             fwd_gbps=fwd_bytes / t_f / 1e9, **triton_blocks(name))


def bench_dense_sdpa(B, L, H, device, dtype, reps):
    """The dense predecessor at the same L: MLA's MHA form (qk 192, v 128), causal, fwd and fwd+bwd."""
    q = torch.randn(B, H, L, 192, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, L, 192, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, L, 128, device=device, dtype=dtype, requires_grad=True)
    flops = 2 * B * H * (192 + 128) * L * (L + 1) / 2  # causal pairs

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.sum().backward()

    t_f = timeit(fwd, reps)
    t_b = max(timeit(fwd_bwd, reps) - t_f, 1e-9)
    emit(op="dense_sdpa", impl="torch", B=B, L=L, H=H, fwd_ms=1e3 * t_f, bwd_ms=1e3 * t_b,
         fwd_tflops=flops / t_f / 1e12, bwd_tflops=2.5 * flops / t_b / 1e12)


def bench_indexer(impls, B, T, S, H, D, device, dtype, reps):
    q = torch.randn(B, T, H, D, device=device).to(dtype)
    w = torch.randn(B, T, H, device=device)
    k = torch.randn(B, S, D, device=device).to(dtype)
    pairs = B * sum(min(S, S - T + t + 1) for t in range(T))  # visible (query, key) pairs
    nbytes = B * (T * H * D + S * D) * q.element_size() + 4 * B * T * S
    for name, fn in impls.items():
        t = timeit(lambda: fn(q, w, k), reps)
        emit(op="indexer_scores", impl=name, B=B, T=T, S=S, H=H, D=D, dtype=str(dtype)[6:], ms=1e3 * t,
             tflops=2 * pairs * H * D / t / 1e12, gbps=nbytes / t / 1e9)


def bench_topk(impls, B, T, S, K, device, reps):
    scores = torch.randn(B, T, S, device=device)
    scores.masked_fill_(torch.arange(S, device=device)[None, None, :] >
                        torch.arange(S - T, S, device=device)[None, :, None], float("-inf"))
    for name, fn in impls.items():
        t = timeit(lambda: fn(scores, K), reps)
        emit(op="topk", impl=name, B=B, T=T, S=S, K=K, ms=1e3 * t, gbps=4 * B * T * S / t / 1e9)


def bench_kl(impls, B, T, K, device, reps):
    scores = torch.randn(B, T, K, device=device, requires_grad=True)
    target = torch.rand(B, T, K, device=device)
    for name, fn in impls.items():
        t = timeit(lambda: torch.autograd.grad(fn(target, scores), scores), reps)
        emit(op="indexer_kl", impl=name, B=B, T=T, K=K, fwd_bwd_ms=1e3 * t, gbps=12 * B * T * K / t / 1e9)


def bench_indexer_topk(impls, B, T, H, D, K, reps):
    """Scores and selection together (what a sparse layer runs), causal, T queries over T keys. The
    reference calls the public scores and top-k ops: timed under DSARL_KERNELS=<impl>, so each line is
    what that setting runs."""
    q, w, k = torch.randn(B, T, H, D), torch.randn(B, T, H), torch.randn(B, T, D)
    for name, fn in impls.items():
        with dispatch.forcing(name):
            t = timeit(lambda: fn(q, w, k, K), reps)
        emit(op="indexer_topk", impl=name, B=B, T=T, H=H, D=D, K=K, ms=1e3 * t)


def bench_rowwise(rows, width, reps):
    """RMSNorm and SwiGLU's product, forward and forward + backward, at a decode step's and a learner
    micro-batch's rows (the bench model: hidden 256, intermediate 896)."""
    x, w, u = torch.randn(rows, width), torch.randn(width), torch.randn(rows, width)
    for op, call in (("rms_norm", lambda fn, a: fn(a, w, 1e-6)), ("swiglu", lambda fn, a: fn(a, u))):
        for name, fn in backends(op, "cpu").items():
            t = timeit(lambda: call(fn, x), reps)
            xg = x.clone().requires_grad_()
            tb = timeit(lambda: call(fn, xg).backward(x), reps)
            emit(op=op, impl=name, rows=rows, width=width, fwd_us=1e6 * t, fwd_bwd_us=1e6 * tb)


def backends(op: str, device: str) -> dict:
    """{backend: implementation} of `op`'s table that can run on `device` here (kernels/dispatch.py)."""
    x = torch.empty(0, device=device)
    return {b: dispatch.implementation(op, b) for b in dispatch.TABLES[op]
            if b == "reference" or dispatch.unusable(op, b, x) is None}


def run_cpu(quick: bool):
    reps = 2 if quick else 3
    shapes = [(1, 256, 256, 8, 96, 64, 64)] if quick else [(1, 512, 512, 16, 576, 512, 256),
                                                          (1, 2048, 2048, 16, 576, 512, 256),
                                                          (1, 16384, 16384, 6, 160, 128, 256),  # prefill model
                                                          (8, 1000, 1000, 4, 80, 64, 256)]  # grpo_step's, 1k
    for B, T, S, H, Dqk, d_v, K in shapes:
        # the reference gathers [B, T, K, Dqk] at once: 16k x 256 x 160 floats x autograd copies is too big
        run = {n: f for n, f in backends("sparse_mla", "cpu").items() if n != "reference" or B * T <= 2048}
        bench_sparse(run, B, T, S, H, Dqk, d_v, K, torch.float32, "cpu", reps)
    L = 256 if quick else 1024
    bench_indexer(backends("indexer_scores", "cpu"), 1, L, L, 8 if quick else 16, 64, "cpu", torch.float32, reps)
    for T, S, K in ([(L, L, 64)] if quick else [(L, L, 64), (2048, 2048, 128), (512, 8192, 256)]):
        bench_topk(backends("topk", "cpu"), 1, T, S, K, "cpu", reps)
    for T in ([2048] if quick else [2048, 16384]):  # the conversion path's and the prefill bench's lengths
        # the reference scores [chunk, T, H] at once and runs two topk passes per row: 2048 tokens only
        run = {n: f for n, f in backends("indexer_topk", "cpu").items() if n != "reference" or T <= 2048}
        bench_indexer_topk(run, 1, T, 4, 32, 128 if T == 2048 else 256, reps)
    bench_kl(backends("indexer_kl", "cpu"), 1, L, 256, "cpu", reps)
    for rows, width in ((64, 256), (960, 256), (960, 896)):
        bench_rowwise(rows, width, 20 * reps)


FAILED: list[str] = []


def tune_sparse_bwd(B, T, S, H, Dqk, d_v, K, dtype, reps):
    """The Triton sparse MLA backward at each (BH, BK, num_stages) the GPU holds: one JSON line each, to
    choose triton.py's first candidate from measurements (the default asks more shared memory than an
    H100 has at H=128, d_v=512 and falls back)."""
    from dsarl.kernels.sparse_mla import triton as sparse_triton

    q = torch.randn(B, T, H, Dqk, device="cuda", dtype=dtype, requires_grad=True)
    kv = torch.randn(B, S, Dqk, device="cuda", dtype=dtype, requires_grad=True)
    idx = causal_indices(B, T, S, K, "cuda")
    do = torch.randn(B, T, H, d_v, device="cuda", dtype=dtype)
    key = ("_sparse_mla_bwd_kernel", H, K, Dqk, d_v, dtype)
    fn = dispatch.implementation("sparse_mla", "triton")
    out, _ = fn(q, kv, idx, Dqk ** -0.5, d_v)
    flops = sparse_flops(B * T, K, H, Dqk, d_v)[1]
    for bh in (16, 32, 64):
        for bk in (16, 32, 64):
            for stages in (1, 2, 3):
                sparse_triton._FITTING[key] = (bh, bk, stages)
                try:
                    t = timeit(lambda: torch.autograd.grad(out, (q, kv), do, retain_graph=True), reps)
                except Exception as e:  # noqa: BLE001 - a block size this GPU cannot hold
                    emit(op="sparse_mla_bwd_blocks", BH=bh, BK=bk, num_stages=stages, error=type(e).__name__)
                    continue
                emit(op="sparse_mla_bwd_blocks", T=T, S=S, H=H, K=K, BH=bh, BK=bk, num_stages=stages,
                     bwd_ms=1e3 * t, bwd_tflops=flops / t / 1e12)
    sparse_triton._FITTING.pop(key, None)


def attempt(fn, *args, **kwargs):
    """fn(*args) with its failure printed as a JSON line and counted: one broken case leaves the rest to run."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported, and main exits non-zero
        FAILED.append(fn.__name__)
        emit(op=fn.__name__, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_cuda(quick: bool):
    reps = 3 if quick else 10
    H, Dqk, d_v, K, H_I, D_I = 128, 576, 512, 2048, 64, 128
    lengths = [8192] if quick else [8192, 16384, 32768, 65536]
    sparse = backends("sparse_mla", "cuda")
    for L in lengths:
        T = min(L, 4096)  # the last T queries of an L-token sequence: every query sees >= L - T keys
        if L == lengths[0]:  # the reference gathers [T, K, Dqk]: a small T only
            attempt(bench_sparse, {"reference": sparse["reference"]}, 1, 256, L, H, Dqk, d_v, K, torch.bfloat16,
                    "cuda", 2)
        attempt(bench_sparse, {"triton": sparse["triton"]}, 1, T, L, H, Dqk, d_v, K, torch.bfloat16, "cuda", reps)
        if L == lengths[0] and os.environ.get("DSARL_TUNE"):
            attempt(tune_sparse_bwd, 1, T, L, H, Dqk, d_v, K, torch.bfloat16, 3)
        attempt(bench_dense_sdpa, 1, L, H, "cuda", torch.bfloat16, reps)
        T_I = min(L, 2048)  # indexer on a chunk of queries against all L keys (memory O(chunk * L))
        triton_scores = dispatch.implementation("indexer_scores", "triton")
        attempt(bench_indexer, {"triton": triton_scores}, 1, T_I, L, H_I, D_I, "cuda", torch.bfloat16, reps)
        attempt(bench_indexer, {"triton_fp8": triton_scores}, 1, T_I, L, H_I, D_I, "cuda", torch.float8_e4m3fn, reps)
        attempt(bench_topk, {"torch.topk": lambda s, k: s.topk(k, dim=-1), **backends("topk", "cuda")},
                1, T_I, L, K, "cuda", reps)
        attempt(bench_kl, backends("indexer_kl", "cuda"), 1, T, K, "cuda", reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--cpu", action="store_true", help="the CPU cases even when CUDA is present")
    args = parser.parse_args()
    torch.manual_seed(0)
    if torch.cuda.is_available() and not args.cpu:
        run_cuda(args.quick)
    else:
        run_cpu(args.quick)
    if FAILED:
        raise SystemExit(f"failed: {', '.join(FAILED)}")


if __name__ == "__main__":
    main()
