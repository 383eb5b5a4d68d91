"""Index replay payload: the encoded selections (data/index_codec.py) against raw int32, one JSON line per case.

    python bench/index_replay.py --quick                    # small settings (CPU, a minute)
    python bench/index_replay.py --tokens 8192 65536        # the long synthetic rows
    python bench/index_replay.py --checkpoint DIR           # rollouts of a trained sparse checkpoint too

Cases:
  engine     rollouts of a sparse model through the native engine (`model` says which: random-init tiny,
             configs/models/tiny.yaml's shape, unless --checkpoint), and one GRPO learner step on them;
             `decode_frac` is the decode time of the step's records over that step's time
  synthetic  long rows at K = 64, 256, 2048, queries at positions C .. C + T - 1 (C = T): `local` rows are
             a recent window of K/4 keys plus K - K/4 far keys of which a fraction `churn` is replaced each
             step; `random` rows are uniform random K-subsets of the visible keys (the worst case)
  fp8        the sampler's selections with the FP8 indexer (q^I, k^I quantised, kernels/fp8.py) against the
             learner's fp32 indexer on the same tokens: the share of rows whose set differs, and the keys
             that differ in such a row (what a fingerprint-and-patch scheme would have to send);
             `rows_differ_fp8_recomputed`: the same count with the learner in FP8 too (cached decode
             against one uncached forward: what differs without the precision mismatch)
Sizes: `bytes_per_token_layer` (encoded) against `raw_bytes_per_token_layer` (4 K); `ratio` = raw /
encoded; `candidates`: ratio of each variant (gaps only / with deltas, varints with or without deflate);
the default encoding is `delta_deflate`. Times are the best of --repeat runs, in seconds: `encode_s` with
the row coder dispatch chooses (C on a CPU with a compiler), `encode_reference_s` with the numpy reference
(DSARL_KERNELS=reference, the same bytes); `decode_s` and `decode_reference_s` likewise.
"""
import argparse
import copy
import json
import random
import time

import numpy as np
import torch

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.data.index_codec import canonical_rows, decode_indices, encode_indices
from dsarl.data.step_types import GroupSample
from dsarl.kernels import dispatch
from dsarl.learner.grpo_learner import GRPOLearner, LearnerConfig
from dsarl.models import ByteTokenizer, DSAConfig, build_model, from_pretrained

CANDIDATES = {"gaps": dict(delta=False, compress=False), "gaps_deflate": dict(delta=False, compress=True),
              "delta": dict(delta=True, compress=False), "delta_deflate": dict(delta=True, compress=True)}


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sizes(records: list, repeat: int) -> dict:
    """records: raw [T, L, K] int arrays -> sizes of each candidate and the default's encode/decode times."""
    rows = sum(r.shape[0] * r.shape[1] for r in records)
    K = records[0].shape[2]
    raw = 4 * rows * K
    cand = {name: sum(encode_indices(r, **kw).nbytes for r in records) for name, kw in CANDIDATES.items()}
    packed = [encode_indices(r) for r in records]
    for r, p in zip(records, packed):  # a bench on a wrong codec is worth nothing
        assert np.array_equal(decode_indices(p).numpy(), canonical_rows(torch.as_tensor(r)).numpy())
    encode_s = best_time(lambda: [encode_indices(r) for r in records], repeat)
    decode_s = best_time(lambda: [decode_indices(p) for p in packed], repeat)
    with dispatch.forcing("reference"):
        reference = [encode_indices(r) for r in records]
        encode_ref_s = best_time(lambda: [encode_indices(r) for r in records], repeat)
        decode_ref_s = best_time(lambda: [decode_indices(p) for p in packed], repeat)
    assert [p.data for p in reference] == [p.data for p in packed]
    nbytes = cand["delta_deflate"]
    return dict(K=K, rows=rows, raw_bytes=raw, bytes=nbytes, bytes_per_token_layer=round(nbytes / rows, 2),
                raw_bytes_per_token_layer=4 * K, ratio=round(raw / nbytes, 1),
                candidates={k: round(raw / v, 1) for k, v in cand.items()},
                encode_s=round(encode_s, 4), encode_reference_s=round(encode_ref_s, 4), decode_s=round(decode_s, 4),
                decode_reference_s=round(decode_ref_s, 4),
                encode_mb_s=round(raw / 2**20 / encode_s, 1), decode_mb_s=round(raw / 2**20 / decode_s, 1))


# ---- engine rollouts and a learner step -------------------------------------------------------------

def load_model(args, **overrides):
    if args.checkpoint:
        model, _ = from_pretrained(args.checkpoint, attention="sparse", **overrides)
        return model, f"checkpoint:{args.checkpoint}"
    cfg = DSAConfig(attention="sparse", max_position_embeddings=args.prompt + args.new_tokens + 8, **overrides)
    return build_model(cfg, seed=0), "tiny-random-init"


def rollouts(model, args, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, 256, (args.prompts, args.prompt), generator=g).tolist()
    engine = NativeEngine(model, ByteTokenizer(), max_batch_size=args.prompts * args.group, attention="sparse")
    params = SamplingParams(max_new_tokens=args.new_tokens, n=args.group, ignore_eos=True, return_indices=True,
                            seed=seed)
    return engine.generate(prompts, params)


def engine_case(args) -> dict:
    model, name = load_model(args)
    comps = rollouts(model, args)
    records = [c.indices.decode().numpy() for c in comps]
    out = dict(case="engine", model=name, prompt=args.prompt, new_tokens=args.new_tokens,
               layers=records[0].shape[1], **sizes(records, args.repeat))
    rng = random.Random(0)
    groups = [GroupSample(comps[p * args.group].prompt_ids, [c.token_ids for c in cs], [c.logprobs for c in cs],
                          [rng.uniform(-1, 1) for _ in cs], indices=[c.indices for c in cs])
              for p in range(args.prompts) for cs in [comps[p * args.group:(p + 1) * args.group]]]
    learner = GRPOLearner(copy.deepcopy(model), None, LearnerConfig(temperature=1.0))
    learner.update(groups)  # warm-up: first-call costs
    step_s = best_time(lambda: learner.update(groups), args.repeat)
    decode_s = best_time(lambda: [decode_indices(c.indices) for c in comps], args.repeat)
    return dict(out, learner_step_s=round(step_s, 3), step_decode_s=round(decode_s, 4),
                decode_frac=round(decode_s / step_s, 4))


# ---- synthetic long rows ----------------------------------------------------------------------------

def local_rows(T: int, K: int, first_q: int, churn: float, rng) -> np.ndarray:
    """[T, 1, K]: the recent window q - W + 1 .. q (W = K / 4) and F = K - W far keys; each step every far
    slot is redrawn with probability `churn`. Slot j only holds keys = j mod F, so slots never collide."""
    assert first_q >= K, "far keys need q - W >= F visible keys"
    W = K // 4
    F = K - W
    q = first_q + np.arange(T)  # [T]
    change = rng.random((T, F)) < churn
    change[0] = True
    top = (q[:, None] - W - np.arange(F)[None]) // F  # the largest u with j + F u <= q - W: [T, F]
    draws = np.arange(F)[None] + F * (rng.random((T, F)) * (top + 1)).astype(np.int64)
    last = np.maximum.accumulate(np.where(change, np.arange(T)[:, None], 0), axis=0)  # step of the last redraw
    far = np.take_along_axis(draws, last, axis=0)
    recent = q[:, None] - np.arange(W)[None]
    return np.concatenate([recent, far], axis=1).astype(np.int32)[:, None, :]


def random_rows(T: int, K: int, first_q: int, rng) -> np.ndarray:
    """[T, 1, K]: a random K-subset of 0..q per row (sorted draws + 0..K-1 are distinct)."""
    q = first_q + np.arange(T)
    u = np.sort(rng.integers(0, (q - K + 2)[:, None], (T, K)), axis=1) + np.arange(K)[None]
    return u.astype(np.int32)[:, None, :]


def synthetic_cases(args):
    rng = np.random.default_rng(0)
    for T in args.tokens:
        for K in args.topk:
            for churn in args.churn:
                yield dict(case="synthetic", rows_kind="local", churn=churn, T=T, context=T,
                           **sizes([local_rows(T, K, max(T, K), churn, rng)], args.repeat))
            yield dict(case="synthetic", rows_kind="random", T=T, context=T,
                       **sizes([random_rows(T, K, max(T, K), rng)], args.repeat))


# ---- FP8 sampler against the fp32 learner -----------------------------------------------------------

def recomputed_selection(model, c, fp8: bool) -> torch.Tensor:
    """The learner's own selection (one uncached forward; indexer in fp8 or fp32) for each query that
    produced a completion token: [T, L, K], rows canonical."""
    for layer in model.model.layers:
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.fp8 = fp8
    plen = len(c.prompt_ids)
    with torch.no_grad():
        out = model(torch.tensor([c.prompt_ids + c.token_ids]), attention="sparse", return_indices=True)
    return canonical_rows(torch.stack([i[0, plen - 1: plen - 1 + len(c.token_ids)] for i in out.indices], dim=1))


def differing_rows(comps, recomputed) -> tuple[int, int, int]:
    """(rows with a choice, rows whose set differs, keys that differ summed over them) between the
    engine's records and the recomputed selections. Rows whose query sees <= K keys select them all."""
    differ = sym = rows = 0
    for c, b in zip(comps, recomputed):
        a = c.indices.decode()
        K = a.shape[2]
        q = len(c.prompt_ids) - 1 + torch.arange(a.shape[0])  # query position of each row
        real = (q + 1 > K)[:, None].expand(a.shape[:2])
        for t, layer in real.nonzero().tolist():
            x, y = set(a[t, layer].tolist()), set(b[t, layer].tolist())
            differ += x != y
            sym += len(x ^ y) // 2
        rows += int(real.sum())
    return rows, differ, sym


def fp8_case(args) -> dict:
    model, name = load_model(args, index_fp8=True)
    comps = rollouts(model, args, seed=1)  # the sampler: FP8 indexer
    rows, differ, sym = differing_rows(comps, [recomputed_selection(model, c, fp8=False) for c in comps])
    _, same, _ = differing_rows(comps, [recomputed_selection(model, c, fp8=True) for c in comps])
    return dict(case="fp8", model=name, K=comps[0].indices.shape[2], prompt=args.prompt,
                new_tokens=args.new_tokens, rows_with_choice=rows, rows_differ=differ,
                rows_differ_frac=round(differ / max(rows, 1), 4),
                keys_differ_per_differing_row=round(sym / max(differ, 1), 2),
                rows_differ_fp8_recomputed=same)  # baseline: the learner recomputing in FP8 too (cache vs none)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small settings: a CPU minute")
    ap.add_argument("--checkpoint", default=None, help="a sparse checkpoint for the engine and fp8 cases")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192])
    ap.add_argument("--topk", type=int, nargs="+", default=[64, 256, 2048])
    ap.add_argument("--churn", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=["engine", "synthetic", "fp8"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.prompt, args.new_tokens, args.prompts, args.group, args.repeat = [2048], 160, 32, 2, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if "engine" in args.cases:
        print(json.dumps(engine_case(args)), flush=True)
    if "synthetic" in args.cases:
        for line in synthetic_cases(args):
            print(json.dumps(line), flush=True)
    if "fp8" in args.cases:
        print(json.dumps(fp8_case(args)), flush=True)


if __name__ == "__main__":
    main()
