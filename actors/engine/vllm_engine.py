"""The `vllm` engine: the native engine's interface on vLLM's offline `LLM` API (optional extra).

    pip install 'dsarl[vllm]'     # GPU nodes; vLLM >= 0.11 serves DeepseekV32ForCausalLM checkpoints

- generate: one vLLM request per prompt (token ids in, `n` samples out), its seed derived from
  (seed, prompt index) so results do not depend on batching; `logprobs=0` returns the sampled token's
  log-probability. We build `LLM(..., logprobs_mode="processed_logprobs")` so that value is taken
  after temperature and top-p/k, like the native engine's; with older vLLMs that lack the option it
  is the raw model log-probability (the mismatch the learner's importance correction then absorbs).
- Not available from vLLM: the keep mask and the indexer's selections (asking raises).
- load_weights: `collective_rpc` into every vLLM worker, where `WeightUpdateExtension` (installed
  with `worker_extension_cls`) calls the model's own `load_weights` on (name, tensor) pairs.
Pure conversions (`vllm_request_kwargs`, `completion_from_output`) are tested without vLLM.
"""
import numpy as np
import torch

from .sampling import SamplingParams, sample_keys
from .stopping import cut_at_stop_string
from .types import Completion

EXTENSION = "dsarl.actors.engine.vllm_engine.WeightUpdateExtension"


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
    stop_ids = list(params.stop_token_ids)
    return dict(
        n=params.n, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1,  # vLLM: -1 (or 0 in new releases) = disabled
        max_tokens=params.max_new_tokens, stop=list(params.stop_strings) or None, stop_token_ids=stop_ids or None,
        ignore_eos=params.ignore_eos, seed=request_seed(params.seed, prompt_index), logprobs=0,
        include_stop_str_in_output=False, skip_special_tokens=True,
    )


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
    def __init__(self, model_dir: str, weight_version: int = 0, **llm_kwargs):
        from vllm import LLM

        kwargs = dict(model=str(model_dir), worker_extension_cls=EXTENSION, logprobs_mode="processed_logprobs")
        kwargs.update(llm_kwargs)
        try:
            self.llm = LLM(**kwargs)
        except TypeError:  # a vLLM without logprobs_mode
            kwargs.pop("logprobs_mode")
            self.llm = LLM(**kwargs)
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
        sp = VSP(max_tokens=1, prompt_logprobs=0, temperature=temperature)
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

        outs = self.llm.generate(prompts, VSP(max_tokens=1, logprobs=top, temperature=1.0), use_tqdm=False)
        result = []
        for o in outs:
            step = o.outputs[0].logprobs[0]
            result.append(sum(float(np.exp(lp.logprob)) for tid, lp in step.items()
                              if self.tokenizer.decode([tid]).lstrip(" ").startswith(("yes", "Yes"))))
        return result

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.llm.collective_rpc("dsarl_load_weights", args=(list(state_dict.items()),))
        self.weight_version = version
