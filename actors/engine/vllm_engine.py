"""The `vllm` engine: the native engine's interface on vLLM's offline `LLM` API (optional extra).

    pip install 'dsarl[vllm]'     # GPU nodes; vLLM >= 0.11 serves DeepseekV32ForCausalLM checkpoints

- generate: one vLLM request per prompt (token ids in, `n` samples out), its seed derived from
  (seed, prompt index) so results do not depend on batching; `logprobs=0` returns the sampled token's
  log-probability. We build `LLM(..., logprobs_mode="processed_logprobs")` so that value is taken
  after temperature and top-p/k, like the native engine's; with older vLLMs that lack the option it
  is the raw model log-probability (the mismatch the learner's importance correction then absorbs).
- Not available from vLLM: the keep mask, the indexer's selections and the MoE routing (asking raises).
- Every keyword passed to vLLM (`llm_kwargs`, the request kwargs, `generate(use_tqdm=)`,
  `collective_rpc(method, args=)`, `TokensPrompt(prompt_token_ids=)`) is checked against the source
  of CHECKED_VLLM_VERSIONS by tests/actors/test_vllm_contract.py.
- load_weights: `collective_rpc` into every vLLM worker, where `WeightUpdateExtension` (installed
  with `worker_extension_cls`) calls the model's own `load_weights` on (name, tensor) pairs.
Pure conversions (`vllm_request_kwargs`, `completion_from_output`) are tested without vLLM.
"""
import numpy as np
import torch

from .sampling import SamplingParams, sample_keys
from .stopping import cut_at_stop_string
from dsarl.data.step_types import Completion

EXTENSION = "dsarl.actors.engine.vllm_engine.WeightUpdateExtension"
# The vLLM releases every keyword below is checked against (tests/actors/test_vllm_contract.py reads
# their source from the wheels, without importing vLLM): the oldest pyproject allows and the newest
# we have read.
CHECKED_VLLM_VERSIONS = ("0.11.0", "0.34.0")
INSTALL_HINT = "engine 'vllm' needs vLLM: pip install 'dsarl[vllm]' (GPU nodes)"


class WeightUpdateExtension:
    """Mixed into vLLM's GPU worker (worker_extension_cls): runs inside each worker process."""

    def dsarl_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        device = next(self.model_runner.model.parameters()).device
        self.model_runner.model.load_weights(weights=[(n, t.to(device)) for n, t in named_tensors])
        return len(named_tensors)


def request_seed(seed: int, prompt_index: int) -> int:
    return int(sample_keys(seed, np.array([prompt_index]), np.array([0]))[0] >> np.uint64(33))  # 31-bit


def vllm_request_kwargs(params: SamplingParams, prompt_index: int, eos_id: int | None) -> dict:
    """Our SamplingParams -> keyword arguments of vllm.SamplingParams for one prompt."""
    if params.return_keep_mask or params.return_indices:
        raise ValueError("engine 'vllm' cannot return keep masks or indexer selections; use engine 'native'")
    if params.return_experts:
        raise ValueError("engine 'vllm' does not return MoE routing (return_experts) here; use engine 'native', "
                         "or set learner.use_sampler_experts: false to let the learner route by itself")
    stop_ids = list(params.stop_token_ids)
    return dict(
        n=params.n, temperature=params.temperature, top_p=params.top_p,
        top_k=max(params.top_k, 0),  # 0 disables top-k in every checked vLLM
        max_tokens=params.max_new_tokens, stop=list(params.stop_strings) or None, stop_token_ids=stop_ids or None,
        ignore_eos=params.ignore_eos, seed=request_seed(params.seed, prompt_index), logprobs=0,
        include_stop_str_in_output=False, skip_special_tokens=True,
    )


def llm_kwargs(model_dir: str, max_batch_size: int = 256, **extra) -> dict:
    """Our engine options -> keyword arguments of vllm.LLM (extra ones pass through to its EngineArgs).
    max_batch_size is vLLM's max_num_seqs: the most sequences one scheduler step runs."""
    return dict(model=str(model_dir), worker_extension_cls=EXTENSION, logprobs_mode="processed_logprobs",
                max_num_seqs=max_batch_size, **extra)


def score_request_kwargs(temperature: float) -> dict:
    """vllm.SamplingParams for scoring given tokens: one new token, the prompt's own log-probs."""
    return dict(max_tokens=1, prompt_logprobs=0, temperature=temperature)


def judge_request_kwargs(top: int) -> dict:
    """vllm.SamplingParams for a judge's next-token distribution: the `top` most likely tokens."""
    return dict(max_tokens=1, logprobs=top, temperature=1.0)


def completion_from_output(out, prompt_index: int, sample_index: int, prompt_ids: list[int],
                           stop_strings, weight_version: int) -> Completion:
    """One vLLM CompletionOutput (token_ids, text, logprobs: per step {token_id: Logprob}) -> Completion."""
    token_ids = list(out.token_ids)
    logprobs = [float(step[t].logprob) for t, step in zip(token_ids, out.logprobs)]
    reason = "length" if out.finish_reason == "length" else "stop"
    return Completion(prompt_index=prompt_index, sample_index=sample_index, prompt_ids=list(prompt_ids),
                      token_ids=token_ids, logprobs=logprobs, finish_reason=reason,
                      text=cut_at_stop_string(out.text, tuple(stop_strings)), weight_version=weight_version)


class VLLMEngine:
    def __init__(self, model_dir: str, weight_version: int = 0, max_batch_size: int = 256, **extra):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(f"{INSTALL_HINT}: {e}") from e

        self.llm = LLM(**llm_kwargs(model_dir, max_batch_size, **extra))
        self.tokenizer = self.llm.get_tokenizer()
        self.weight_version = weight_version

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 prompt_indices: list[int] | None = None) -> list[Completion]:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        indices = prompt_indices if prompt_indices is not None else list(range(len(prompts)))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sps = [VSP(**vllm_request_kwargs(params, i, eos)) for i in indices]
        outputs = self.llm.generate(requests, sps, use_tqdm=False)  # returned in request order
        return [completion_from_output(o, i, j, p, params.stop_strings, self.weight_version)
                for i, p, req in zip(indices, prompts, outputs) for j, o in enumerate(req.outputs)]

    def score(self, prompt_ids, completion_ids, temperature: float = 1.0):
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        single = bool(prompt_ids) and isinstance(prompt_ids[0], int)
        prompts, comps = ([prompt_ids], [completion_ids]) if single else (prompt_ids, completion_ids)
        sp = VSP(**score_request_kwargs(temperature))
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p) + list(c)) for p, c in zip(prompts, comps)],
                                 sp, use_tqdm=False)
        scores = []
        for p, c, o in zip(prompts, comps, outs):
            steps = o.prompt_logprobs[len(p):]  # entry t: {token_id: Logprob} of token t
            scores.append([float(step[t].logprob) for t, step in zip(c, steps)])
        return scores[0] if single else scores

    def yes_probability(self, prompts: list[str], top: int = 20) -> list[float]:
        """Approximate: the mass of the `top` most likely next tokens whose text starts with yes/Yes."""
        from vllm import SamplingParams as VSP

        outs = self.llm.generate(prompts, VSP(**judge_request_kwargs(top)), use_tqdm=False)
        result = []
        for o in outs:
            step = o.outputs[0].logprobs[0]
            result.append(sum(float(np.exp(lp.logprob)) for tid, lp in step.items()
                              if self.tokenizer.decode([tid]).lstrip(" ").startswith(("yes", "Yes"))))
        return result

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.llm.collective_rpc("dsarl_load_weights", args=(list(state_dict.items()),))
        self.weight_version = version
