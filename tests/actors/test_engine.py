"""NativeEngine against plain references: full-model forwards without a cache, step by step."""
import pytest
import torch

from dsarl.actors.engine import NativeEngine, SamplingParams, keep_mask_tensor
from dsarl.kernels.indexer_scores.reference import indexer_scores_reference
from dsarl.models import ByteTokenizer, build_model
from dsarl.models.rope import rope_angles

from tiny_engine import CFG, TOK

PROMPTS = [TOK.encode(s, add_bos=True) for s in ["hi", "hello world, how", "a", "the quick brown", "xyz!"]]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/actors/conftest.py


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0).requires_grad_(False)


def full_logits(model, ids: list[int], attention: str) -> torch.Tensor:
    return model(torch.tensor([ids]), attention=attention).logits[0].float()  # [T, V], no cache


def greedy_reference(model, prompt, attention, max_new, eos):
    ids = list(prompt)
    for _ in range(max_new):
        t = int(full_logits(model, ids, attention)[-1].argmax())
        ids.append(t)
        if t == eos:
            break
    return ids[len(prompt):]


def sequence_logprobs(model, prompt, tokens, attention) -> torch.Tensor:
    """log_softmax of one uncached forward over prompt + tokens, at the tokens (the learner's view).

    Not the step-by-step forwards: an uncached forward over a longer sequence may break a tie in the
    indexer's top-k (keys whose ReLU terms are all 0) differently, so earlier positions' selections,
    and with them the logits, can move by ~1e-2 between lengths."""
    logp = torch.log_softmax(full_logits(model, list(prompt) + list(tokens), attention), -1)
    return logp[torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1), torch.tensor(tokens)]


@pytest.mark.parametrize("attention", ["dense", "sparse"])
@pytest.mark.parametrize("continuous", [True, False])
def test_greedy_equals_uncached_argmax(model, attention, continuous):
    engine = NativeEngine(model, TOK, max_batch_size=2, attention=attention, continuous=continuous)
    params = SamplingParams(temperature=0.0, max_new_tokens=14)
    out = engine.generate(PROMPTS, params)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, 0) for i in range(len(PROMPTS))]
    for c, p in zip(out, PROMPTS):
        ref_tokens = greedy_reference(model, p, attention, 14, TOK.eos_id)
        assert c.token_ids == ref_tokens
        ref_logps = sequence_logprobs(model, p, ref_tokens, attention)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref_logps, rtol=0, atol=1e-5)
        assert c.finish_reason == ("stop" if ref_tokens[-1] == TOK.eos_id else "length")


def reference_keep(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Plain per-row definition: top-k by value, then the smallest prefix reaching top_p."""
    keep = torch.zeros_like(x, dtype=torch.bool)
    for t in range(x.shape[0]):
        order = x[t].argsort(descending=True)[:top_k]
        probs = torch.softmax(x[t, order], -1)
        mass = 0.0
        for j, tok in enumerate(order.tolist()):
            keep[t, tok] = True
            mass += float(probs[j])
            if mass >= top_p:
                break
    return keep


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_sampling_logprobs_and_keep_mask(model, attention):
    T_, top_p, top_k = 0.7, 0.8, 40
    engine = NativeEngine(model, TOK, max_batch_size=4, attention=attention)
    params = SamplingParams(temperature=T_, top_p=top_p, top_k=top_k, max_new_tokens=10, n=2, seed=3,
                            return_keep_mask=True)
    for c in engine.generate(PROMPTS, params):
        seq = c.prompt_ids + c.token_ids
        x = full_logits(model, seq, attention)[len(c.prompt_ids) - 1: len(seq) - 1] / T_  # [T, V]
        keep = reference_keep(x, top_k, top_p)
        assert torch.equal(keep_mask_tensor(c.keep_mask, CFG.vocab_size), keep)
        tokens = torch.tensor(c.token_ids)
        assert keep[torch.arange(len(tokens)), tokens].all()
        ref = torch.log_softmax(x.masked_fill(~keep, float("-inf")), -1)[torch.arange(len(tokens)), tokens]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, rtol=0, atol=1e-5)


def test_samples_independent_of_batching(model):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, n=3, seed=11)
    runs = [NativeEngine(model, TOK, max_batch_size=b, continuous=c, attention="sparse").generate(PROMPTS, params)
            for b, c in [(1, True), (4, True), (4, False), (32, True)]]
    for other in runs[1:]:
        assert [c.token_ids for c in other] == [c.token_ids for c in runs[0]]
        for a, b in zip(other, runs[0]):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
    # a shard with global prompt indices samples what the whole call sampled for those prompts
    shard = NativeEngine(model, TOK, max_batch_size=4, attention="sparse").generate(PROMPTS[3:], params, prompt_indices=[3, 4])
    assert [c.token_ids for c in shard] == [c.token_ids for c in runs[0][9:]]
    assert [c.prompt_index for c in shard] == [3, 3, 3, 4, 4, 4]
    # a different seed gives different samples
    other_seed = NativeEngine(model, TOK).generate(PROMPTS, SamplingParams(max_new_tokens=12, n=3, seed=12))
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in runs[0]]


def first_end(tokens: list[int], ended) -> int | None:
    """Length of the shortest prefix for which ended(prefix) holds."""
    return next((n for n in range(1, len(tokens) + 1) if ended(tokens[:n])), None)


def test_stop_strings_stop_ids_and_max_tokens_end_exactly(model):
    engine = NativeEngine(model, TOK, max_batch_size=4)
    base = SamplingParams(temperature=1.5, max_new_tokens=40, n=2, seed=5, ignore_eos=True)
    free = engine.generate(PROMPTS, base)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 40 for c in free)
    # a printable two-byte stop string that occurs somewhere, and a stop token id that occurs
    pairs = [(a, b) for c in free for a, b in zip(c.token_ids, c.token_ids[1:]) if 32 <= a < 127 and 32 <= b < 127]
    stop_s = chr(pairs[0][0]) + chr(pairs[0][1])
    stop_id = free[1].token_ids[7]
    params = SamplingParams(temperature=1.5, max_new_tokens=40, n=2, seed=5, ignore_eos=True,
                            stop_strings=[stop_s], stop_token_ids=[stop_id])
    hits = 0
    for c, ref in zip(engine.generate(PROMPTS, params), free):
        n = first_end(ref.token_ids, lambda t: t[-1] == stop_id or stop_s in TOK.decode(t))
        if n is None:
            assert (c.token_ids, c.finish_reason) == (ref.token_ids, "length")
        else:
            hits += 1
            assert c.token_ids == ref.token_ids[:n] and c.finish_reason == "stop"
            full = TOK.decode(c.token_ids)
            assert c.text == (full[: full.index(stop_s)] if stop_s in full else full)
    assert hits >= 2
    short = engine.generate(PROMPTS, SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert all(len(c.token_ids) == 3 and c.finish_reason == "length" for c in short)
    capped = NativeEngine(model, TOK, max_len=20).generate(PROMPTS, SamplingParams(max_new_tokens=50, ignore_eos=True))
    assert all(len(c.prompt_ids) + len(c.token_ids) == 20 and c.finish_reason == "length" for c in capped)


def index_scores(model, seq: list[int]) -> list[torch.Tensor]:
    """Per layer the indexer scores [T, S] of one uncached sparse forward (plain kernels reference)."""
    out = model(torch.tensor([seq]), attention="sparse", collect_aux=True)
    cos, sin = rope_angles(torch.arange(len(seq))[None], CFG.qk_rope_head_dim, CFG.rope_theta)
    scores = []
    for layer, aux in zip(model.model.layers, out.aux):
        idx = layer.self_attn.indexer
        q, w = idx.queries(aux.c_q, aux.x, cos, sin)
        scores.append(indexer_scores_reference(q, w, idx.keys(aux.x, cos, sin))[0])
    return scores


def test_sparse_indices_are_the_models_selection(model):
    """The returned selection is a top-k of the model's index scores at the query that produced each
    token. Compared as the sorted selected scores: keys tied in score may be swapped (STYLE rule 19
    compares sets; ties make the set itself implementation-defined)."""
    engine = NativeEngine(model, TOK, max_batch_size=3, attention="sparse")
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8, return_indices=True))
    exact = total = 0
    for c in out:
        P = len(c.prompt_ids)
        scores = index_scores(model, c.prompt_ids + c.token_ids)
        assert c.indices.shape == (len(c.token_ids), CFG.num_hidden_layers, CFG.index_topk)
        indices = c.indices.decode()  # the engine hands its selections over encoded
        for t in range(len(c.token_ids)):
            for layer in range(CFG.num_hidden_layers):
                row = scores[layer][P - 1 + t]  # [S]
                got = indices[t, layer]
                got = got[got >= 0].long()
                want = row.topk(min(CFG.index_topk, P + t)).values
                assert len(got) == len(want) and len(set(got.tolist())) == len(got)
                assert (got <= P - 1 + t).all()
                torch.testing.assert_close(row[got].sort(descending=True).values, want, rtol=0, atol=1e-5)
                exact += set(got.tolist()) == set(row.topk(len(want)).indices.tolist())
                total += 1
    assert exact >= 0.9 * total  # ties are rare: most selections match the reference exactly


def test_score_and_load_weights(model):
    engine = NativeEngine(model, TOK, max_batch_size=2)
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    scores = engine.score([c.prompt_ids for c in out], [c.token_ids for c in out])
    for c, s in zip(out, scores):
        torch.testing.assert_close(torch.tensor(s), torch.tensor(c.logprobs), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(engine.score(out[0].prompt_ids, out[0].token_ids)), torch.tensor(scores[0]))

    new = build_model(CFG, seed=1)
    local = NativeEngine(build_model(CFG, seed=0), TOK)
    local.load_weights(new.state_dict(), version=7)
    got = local.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    want = NativeEngine(new, TOK).generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert {c.weight_version for c in got} == {7}
    with pytest.raises(ValueError, match="missing"):
        local.load_weights({"lm_head.weight": new.lm_head.weight}, version=8)


def test_yes_probability_matches_chained_conditionals(model):
    engine = NativeEngine(model, TOK)
    prompts = ["Is it? Answer:", "ok"]
    got = engine.yes_probability(prompts)
    for p, g in zip(prompts, got):
        ids = TOK.encode(p, add_bos=True)
        total = 0.0
        for target in ["yes", "Yes", " yes", " Yes"]:
            prob, seq = 1.0, list(ids)
            for ch in TOK.encode(target):
                prob *= float(torch.softmax(full_logits(model, seq, "dense")[-1], -1)[ch])
                seq.append(ch)
            total += prob
        assert g == pytest.approx(total, rel=1e-5)
        assert 0 < g < 1


class ChatByteTokenizer(ByteTokenizer):
    """A tokenizer whose chat turn ends with a token other than eos (as generation_config.json's
    eos_token_id list says for chat models) and which names a stop string."""

    def __init__(self, turn_end: int, stop_string: str = ""):
        super().__init__()
        self.turn_end = turn_end
        self.stop_strings = (stop_string,) if stop_string else ()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_id, self.turn_end)


def test_generation_stops_at_every_tokenizer_stop_id_unless_ignore_eos(model):
    free = NativeEngine(model, TOK).generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    first = free.token_ids[0]  # what greedy decoding emits first: make it the turn-end token
    stopped = NativeEngine(model, ChatByteTokenizer(first)).generate(PROMPTS[:1], SamplingParams(max_new_tokens=6))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    ignored = NativeEngine(model, ChatByteTokenizer(first)).generate(
        PROMPTS[:1], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_a_bf16_models_cpu_cache_is_fp32_and_changes_no_answer(attention, monkeypatch):
    """On a CPU the engine keeps a bf16 model's KV cache in fp32 (native.cache_dtype: its kernels compute in
    fp32 and would widen a bf16 cache at every call). bf16 values are exact in fp32, so tokens, log-probs
    and selections equal those of a cache in the model's own dtype, bit for bit: prefill (MHA), decode
    (absorbed), and sparse top-6 selection with the C kernels."""
    from dsarl.actors.engine import native

    bf16 = build_model(CFG.replace(torch_dtype="bfloat16"), seed=0).requires_grad_(False)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, ignore_eos=True, seed=3, return_indices=True)

    def run():
        return NativeEngine(bf16, TOK, max_batch_size=4, attention=attention).generate(PROMPTS, params)

    assert native.cache_dtype(bf16) == torch.float32
    ours = run()
    monkeypatch.setattr(native, "cache_dtype", lambda model: model.lm_head.weight.dtype)  # the bf16 cache
    theirs = run()
    for a, b in zip(ours, theirs, strict=True):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
        assert (a.indices is None) == (attention == "dense")
        assert a.indices == b.indices  # the encoded selections, byte for byte


def test_a_run_whose_queries_see_at_most_k_keys_runs_dense_and_records_every_visible_key():
    """index_topk 32 against prompts + 8 tokens of at most 26: top-k selects every key a query sees, so a
    sparse engine runs the dense kernels for the whole run (DSAConfig.attention_within) and writes its
    selections from the counts. Its tokens and log-probs are a dense engine's, bit for bit; its records
    decode to rows 0..P + t - 1; and a model that must run the indexer and the sparse kernels
    (index_dense_when_all_fit off) selects the same keys and gives the same tokens."""
    cfg = CFG.replace(index_topk=32)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=8, ignore_eos=True, return_indices=True)
    assert max(map(len, PROMPTS)) + params.max_new_tokens <= cfg.index_topk

    def run(cfg, attention):
        model = build_model(cfg, seed=0).requires_grad_(False)
        return NativeEngine(model, TOK, max_batch_size=3, attention=attention).generate(PROMPTS, params)

    ours, dense = run(cfg, "sparse"), run(cfg, "dense")
    indexed = run(cfg.replace(index_dense_when_all_fit=False), "sparse")
    for a, d, s in zip(ours, dense, indexed, strict=True):
        assert a.token_ids == d.token_ids and a.logprobs == d.logprobs and d.indices is None
        P, T = len(a.prompt_ids), len(a.token_ids)
        want = torch.full((T, cfg.num_hidden_layers, cfg.index_topk), -1, dtype=torch.int32)
        for t in range(T):
            want[t, :, : P + t] = torch.arange(P + t, dtype=torch.int32)
        assert torch.equal(a.indices.decode(), want)
        assert torch.equal(s.indices.decode(), want)  # the indexer's own top-32 of at most 26 keys
        assert s.token_ids == a.token_ids
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-5)


def test_only_a_sparse_run_keeps_the_blocked_indexer_keys(model, monkeypatch):
    """The KV cache's blocked mirror of the indexer keys is read by sparse attention only: a dense run (or a
    sparse one whose queries all see at most k keys) allocates none, a sparse run does (what either run
    generates is checked against uncached argmax by the greedy test above)."""
    import dsarl.actors.engine.native as native_engine

    made = []
    real = native_engine.StaticKVCache

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(native_engine, "StaticKVCache", recording)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=6, ignore_eos=True)
    for attention, cfg in (("dense", CFG), ("sparse", CFG), ("sparse", CFG.replace(index_topk=64))):
        made.clear()
        m = build_model(cfg, seed=0).requires_grad_(False)
        NativeEngine(m, TOK, max_batch_size=4, attention=attention).generate(PROMPTS, params)
        sparse = attention == "sparse" and max(map(len, PROMPTS)) + 6 > cfg.index_topk
        assert made and all((c.k_blocked is not None) == sparse for c in made), (attention, cfg.index_topk)
