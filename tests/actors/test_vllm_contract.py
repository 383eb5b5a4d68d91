"""Every keyword dsarl passes to vLLM exists in each vLLM release we support, read from the release's
source (tests/actors/vllm_source.py) without importing vLLM, so the check runs on a CPU-only machine.
`LLM(max_batch_size=...)`, which no vLLM accepts, is the bug this catches.

The wheels come from `pip download --no-deps` (~240-440 MB each, cached in ~/.cache/dsarl/vllm-wheels);
where the package index cannot be reached the test skips and says why."""
import pytest

from dsarl.actors.engine import SamplingParams
from dsarl.actors.engine.vllm_engine import (CHECKED_VLLM_VERSIONS, EXTENSION, judge_request_kwargs, llm_kwargs,
                                             score_request_kwargs, vllm_request_kwargs)
from dsarl.actors.rollout_workers import sampler_dtype

from vllm_source import VLLMSource, fetch_wheel


@pytest.fixture(scope="module", params=CHECKED_VLLM_VERSIONS)
def vllm_source(request):
    try:
        return VLLMSource(fetch_wheel(request.param))
    except RuntimeError as e:
        pytest.skip(f"vLLM {request.param} source unavailable: {e}")


def test_llm_constructor_accepts_every_engine_argument_we_pass(vllm_source):
    dtype_kwargs, _ = sampler_dtype("vllm", "bfloat16", {})  # what rollout.dtype adds
    passed = set(llm_kwargs("models/m", max_batch_size=32, **dtype_kwargs))
    assert passed > set(llm_kwargs("models/m", max_batch_size=32))
    accepted = vllm_source.parameters("LLM", "__init__", "vllm/entrypoints/") | vllm_source.fields(
        "EngineArgs", "vllm/engine/")  # LLM(**kwargs) builds EngineArgs(**kwargs)
    assert passed <= accepted, f"not vLLM arguments in {vllm_source.wheel.name}: {sorted(passed - accepted)}"
    assert "max_batch_size" not in accepted  # what we used to pass: vLLM calls it max_num_seqs
    assert llm_kwargs("/m", max_batch_size=32)["max_num_seqs"] == 32
    modes = "".join(vllm_source._zip.read(p).decode() for p in vllm_source.files("vllm/config"))
    assert '"processed_logprobs"' in modes  # a LogprobsMode value of this release
    assert all(f'"{d}"' in modes for d in ("bfloat16", "float32"))  # rollout.dtype's values are ModelDType's


def test_sampling_params_accept_every_request_keyword_we_pass(vllm_source):
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=4, n=2, seed=1,
                            stop_strings=["x"], stop_token_ids=[3], ignore_eos=True)
    passed = set(vllm_request_kwargs(params, 0, None)) | set(score_request_kwargs(1.0)) | set(judge_request_kwargs(5))
    fields = vllm_source.fields("SamplingParams", "vllm/sampling_params.py")
    assert passed <= fields, f"not SamplingParams fields in {vllm_source.wheel.name}: {sorted(passed - fields)}"


def test_generate_rpc_prompt_and_output_names_exist(vllm_source):
    assert "use_tqdm" in vllm_source.parameters("LLM", "generate", "vllm/entrypoints/")
    assert {"method", "args"} <= vllm_source.parameters("LLM", "collective_rpc", "vllm/entrypoints/")
    assert "TokensPrompt" in vllm_source.exports("vllm/inputs/__init__.py")
    assert "prompt_token_ids" in vllm_source.fields("TokensPrompt", "vllm/inputs/")
    top = vllm_source._zip.read("vllm/__init__.py").decode()
    assert '"LLM"' in top and '"SamplingParams"' in top  # `from vllm import LLM, SamplingParams`
    # what completion_from_output and score read from the results
    assert {"text", "token_ids", "logprobs", "finish_reason"} <= vllm_source.fields("CompletionOutput",
                                                                                   "vllm/outputs.py")
    assert {"prompt_logprobs", "outputs"} <= vllm_source.parameters("RequestOutput", "__init__", "vllm/outputs.py")
    # the weight-update extension reaches the model through the GPU worker's model_runner
    assert "self.model_runner" in vllm_source._zip.read("vllm/v1/worker/gpu_worker.py").decode()
    assert EXTENSION.rsplit(".", 1)[0] == "dsarl.actors.engine.vllm_engine"
