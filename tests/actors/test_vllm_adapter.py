"""The vLLM adapter: pure conversions run everywhere; the engine itself needs vllm (and a GPU)."""
import importlib.util
from types import SimpleNamespace

import pytest

from dsarl.actors.engine import SamplingParams
from dsarl.actors.engine.vllm_engine import completion_from_output, request_seed, vllm_request_kwargs

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not importable here (optional extra 'vllm', GPU nodes)")


def test_request_kwargs_map_our_params():
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=5, n=4, seed=3,
                       stop_strings=["\n\n"], stop_token_ids=[7], ignore_eos=True)
    kw = vllm_request_kwargs(p, prompt_index=2, eos_id=None)
    assert kw["n"] == 4 and kw["temperature"] == 0.7 and kw["top_p"] == 0.9 and kw["top_k"] == 0
    assert kw["max_tokens"] == 5 and kw["stop"] == ["\n\n"] and kw["stop_token_ids"] == [7] and kw["ignore_eos"]
    assert kw["logprobs"] == 0 and kw["seed"] == request_seed(3, 2) != request_seed(3, 1)
    assert 0 <= kw["seed"] < 2**31
    with pytest.raises(ValueError, match="native"):
        vllm_request_kwargs(SamplingParams(return_indices=True), 0, None)


def test_completion_from_output():
    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731
    out = SimpleNamespace(token_ids=[5, 9], text="ab", finish_reason="stop",
                          logprobs=[{5: lp(-0.5), 1: lp(-2.0)}, {9: lp(-0.25)}])
    c = completion_from_output(out, 3, 1, [1, 2], ["b"], weight_version=7)
    assert (c.prompt_index, c.sample_index, c.token_ids, c.logprobs, c.finish_reason, c.text, c.weight_version) == (
        3, 1, [5, 9], [-0.5, -0.25], "stop", "a", 7)
    out.finish_reason = "length"
    assert completion_from_output(out, 0, 0, [1], [], 0).finish_reason == "length"


@needs_vllm
def test_vllm_engine_generates_scores_and_updates_weights(tmp_path):
    import torch

    from dsarl.actors.engine.vllm_engine import VLLMEngine
    from dsarl.models import DSAConfig, build_model, save_pretrained

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    cfg = DSAConfig(hidden_size=256, num_hidden_layers=2, attention="sparse", torch_dtype="bfloat16")
    save_pretrained(build_model(cfg, seed=0), tmp_path / "m")
    engine = VLLMEngine(tmp_path / "m", enforce_eager=True, gpu_memory_utilization=0.3)
    prompts = [[257, 72, 105], [257, 97]]
    out = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=4, n=2, ignore_eos=True))
    assert [(c.prompt_index, c.sample_index) for c in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(c.token_ids) == 4 and c.finish_reason == "length" for c in out)
    scores = engine.score([c.prompt_ids for c in out], [c.token_ids for c in out])
    for c, s in zip(out, scores):
        assert s == pytest.approx(c.logprobs, abs=1e-2)  # bf16
    engine.load_weights(build_model(cfg, seed=1).state_dict(), version=2)
    assert {c.weight_version for c in engine.generate(prompts, SamplingParams(max_new_tokens=2))} == {2}
