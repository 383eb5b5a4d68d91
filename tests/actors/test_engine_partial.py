"""Partial rollouts in the native engine, without Ray: weights staged at a decode step boundary are
swapped in mid-generation; each token records the version that sampled it, and its log-prob is what a
plain uncached forward of that version's model gives for it."""
import pytest
import torch

from dsarl.actors.engine import NativeEngine, SamplingParams
from dsarl.models import build_model

from tiny_engine import CFG, TOK

PROMPTS = [TOK.encode(s, add_bos=True) for s in ["hello world, how", "a"]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/actors/conftest.py


@pytest.fixture(scope="module")
def models():
    """(version 0, version 1): two independently initialised models of one config."""
    return build_model(CFG, seed=0).requires_grad_(False), build_model(CFG, seed=1).requires_grad_(False)


def reference_logprobs(model, prompt, tokens, temperature, attention="dense") -> torch.Tensor:
    """log_softmax of one uncached forward over prompt + tokens, at the tokens."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    logp = torch.log_softmax(model(ids, attention=attention).logits[0].float() / temperature, -1)
    return logp[torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1), torch.tensor(tokens)]


def fresh_engine(max_batch_size, continuous=True, attention="dense"):
    return NativeEngine(build_model(CFG, seed=0).requires_grad_(False), TOK, max_batch_size=max_batch_size,
                        attention=attention, continuous=continuous)


@pytest.mark.parametrize("k, attention", [(1, "dense"), (5, "dense"), (5, "sparse")])
def test_weights_staged_at_step_k_sample_every_later_token(models, k, attention):
    engine = fresh_engine(max_batch_size=4, attention=attention)  # sparse: the indexer keys are recomputed too  # every sample placed at step 0: tokens 0, 1 at step 0, t + 1 at step t
    v1_state = {n: t.clone() for n, t in models[1].state_dict().items()}
    params = SamplingParams(temperature=0.9, max_new_tokens=12, n=2, seed=7, ignore_eos=True)
    staged = []

    def hook(step):
        if step == k:
            engine.stage_weights(v1_state, 1)
            staged.append(engine.newest_version())
            assert engine.weight_version == 0  # staged, not loaded, while generating

    comps = engine.generate(PROMPTS, params, step_hook=hook)
    assert staged == [1] and engine.weight_version == 1
    for c in comps:
        T = len(c.token_ids)
        assert c.token_versions == [0] * (k + 1) + [1] * (T - k - 1)
        assert c.weight_version == 0  # the oldest token's version
        logp = torch.tensor(c.logprobs)
        for v, model in enumerate(models):
            at = torch.tensor(c.token_versions) == v
            ref = reference_logprobs(model, c.prompt_ids, c.token_ids, params.temperature, attention)
            torch.testing.assert_close(logp[at], ref[at], rtol=1e-4, atol=1e-4)
            # the other version's weights give other log-probs: the check above tells versions apart
            assert not torch.allclose(logp[at], reference_logprobs(models[1 - v], c.prompt_ids, c.token_ids,
                                                                   params.temperature, attention)[at], atol=1e-3)


@pytest.mark.parametrize("continuous", [True, False])
def test_samples_placed_after_the_swap_use_only_the_new_weights(models, continuous):
    """Two slots for three samples of one prompt: the third waits with its prompt's prefill from the old
    weights, which the swap computes again."""
    engine = fresh_engine(max_batch_size=2, continuous=continuous)
    v1_state = models[1].state_dict()
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=1, ignore_eos=True)
    comps = engine.generate(PROMPTS[:1], params,
                            step_hook=lambda step: step == 3 and engine.stage_weights(v1_state, 1))
    first, second, third = comps
    assert first.token_versions == second.token_versions == [0] * 4 + [1] * 4
    assert third.token_versions == [1] * 8 and third.weight_version == 1
    for c in comps:
        logp = torch.tensor(c.logprobs)
        for v, model in enumerate(models):
            at = torch.tensor(c.token_versions) == v
            torch.testing.assert_close(logp[at], reference_logprobs(model, c.prompt_ids, c.token_ids, 1.0)[at],
                                       rtol=1e-4, atol=1e-4)


def test_without_staging_generation_is_unchanged_and_one_version(models):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=2, seed=5)
    plain = fresh_engine(max_batch_size=3).generate(PROMPTS, params)
    engine = fresh_engine(max_batch_size=3)
    hooked = engine.generate(PROMPTS, params, step_hook=lambda step: None)
    assert [c.token_ids for c in hooked] == [c.token_ids for c in plain]
    assert [c.logprobs for c in hooked] == [c.logprobs for c in plain]
    assert all(c.token_versions == [0] * len(c.token_ids) for c in hooked)


def test_stage_weights_when_idle_loads_at_once_and_checks_the_state(models):
    engine = fresh_engine(max_batch_size=2)
    engine.stage_weights(models[1].state_dict(), 3)
    assert engine.weight_version == 3 and engine.newest_version() == 3
    engine.wait_for_version(3, timeout_s=0.0)  # already there: no wait
    with pytest.raises(TimeoutError, match="version >= 4"):
        engine.wait_for_version(4, timeout_s=0.0)
    bad = {k: v for k, v in models[1].state_dict().items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="missing weights"):
        engine.stage_weights(bad, 4)
    assert engine.weight_version == 3


def test_per_token_versions_roundtrip_through_the_rollout_log(models, tmp_path):
    import pyarrow.parquet as pq

    from dsarl.data.rollout_schema import completions_to_table, read_rollouts, table_to_completions, write_rollouts

    engine = fresh_engine(max_batch_size=4)
    params = SamplingParams(max_new_tokens=6, n=2, seed=2, ignore_eos=True)
    comps = engine.generate(PROMPTS, params, step_hook=lambda s: s == 2 and engine.stage_weights(
        models[1].state_dict(), 4))
    write_rollouts(completions_to_table(comps), tmp_path / "r.parquet")
    back = table_to_completions(read_rollouts(tmp_path / "r.parquet"))
    assert [c.token_versions for c in back] == [c.token_versions for c in comps] == [[0, 0, 0, 4, 4, 4]] * 4
    assert [c.weight_version for c in back] == [0] * 4 and all(c.num_versions == 2 for c in back)
    old = completions_to_table(comps).drop_columns(["token_versions"])  # a log written before the column
    pq.write_table(old, tmp_path / "old.parquet")
    assert [c.token_versions for c in table_to_completions(read_rollouts(tmp_path / "old.parquet"))] == [None] * 4
