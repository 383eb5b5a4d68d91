"""Seconds per GRPO step of TRL's GRPOTrainer on grpo_step.py's 16-token case: the baseline it is compared with.

    python bench/trl_grpo_step.py [--precision bf16 fp32] [--steps 6]

Needs TRL: pip install -c constraints.txt -e ".[bench]". The same work as `bench/grpo_step.py --prompt-lens 16`
(whose `--precision fp32 bf16` runs the same two precisions), in one process on this machine's CPU with 2 torch
threads: the same 4-layer, width-256 DSA model (seed 0, saved by dsarl, loaded by transformers as
`deepseek_v32`), 8 arithmetic prompts x 8 samples x up to 16 new tokens at temperature 1 (both stop at eos),
a reference model (beta = 0.01), one optimizer step per generation. A step is the time from the Trainer's
on_step_begin to its on_step_end: generation, reward, reference forward, policy forward and backward, and
AdamW. One JSON line per precision: the median over the steps after the first (which includes warm-up),
every step's time, its split (`generate_s`: transformers' `generate` inside TRL; `reward_and_reference_s`: the
rest of TRL's `_generate_and_score_completions`, the rewards and the reference forward; `train_s`: the rest of the
step, the policy's forward and backward and AdamW; grpo_step.py's `learn_s` holds the reference forward too), and
TRL's own mean completion length (so a reader can check both sides generated ~16 tokens). bf16 is GRPOConfig's
default: fp32 weights with every forward under bf16 autocast; fp32 is plain.

Where the work differs (both sides' defaults): TRL repeats each prompt 8 times and generates with
transformers' `generate` (eager attention, a dynamic KV cache, the indexer run at every step), and its
learner forwards all 64 prompt + completion sequences; dsarl prefills each prompt once per group, in its
own engine, and the learner shares that prefix. TRL scales advantages by the group's std, dsarl does not.
With one optimizer step per generation neither runs a separate old-log-prob forward.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from grpo_step import MODEL  # from this folder, which leaves sys.path before the Hugging Face imports below

from dsarl.data.tasks import make_rows
from dsarl.launch.prompt_tokens import prompt_ids_for
from dsarl.models import ByteTokenizer, DSAConfig, build_model, save_pretrained

# Python puts this folder first on sys.path, and bench/kernels.py would stand in for Hugging Face's `kernels`
# package, which transformers and TRL import: take the folder off before importing them (see rollout.py).
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
try:
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:
    sys.exit(f"{e}: this benchmark needs TRL; install it with `pip install -c constraints.txt -e \".[bench]\"` "
             f"(or `pip install trl`)")

PROMPTS, GROUP, NEW_TOKENS, BETA = 8, 8, 16, 0.01


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step; with gradient_accumulation_steps=1 a step holds its own generation.
    `watch` also times two of the trainer's methods inside each step, for the split: `_generate` (transformers'
    `generate`) and `_generate_and_score_completions` (that, the rewards and the reference forward)."""

    def __init__(self):
        self.start, self.times, self.parts, self._open = 0.0, [], [], {}

    def watch(self, trainer, *names: str) -> None:
        for name in names:
            method = getattr(trainer, name)

            def timed(*a, _method=method, _name=name, **kw):
                t0 = time.perf_counter()
                try:
                    return _method(*a, **kw)
                finally:
                    self._open[_name] = self._open.get(_name, 0.0) + time.perf_counter() - t0
            setattr(trainer, name, timed)

    def on_step_begin(self, args, state, control, **kwargs):
        self._open = {}
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)
        self.parts.append(self._open)


def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the whitespace-collapsed completion is the row's answer (dsarl's exact_match, without extraction)."""
    return [float(" ".join(c.split()) == a) for c, a in zip(completions, answer)]


def prompt_dataset(tokenizer) -> datasets.Dataset:
    """The arithmetic rows of grpo_step.py as plain text. dsarl's raw format is bos + text, and this tokenizer
    adds no bos itself, so the bos token leads each string; the ids TRL will see must equal dsarl's."""
    rows = make_rows("arithmetic", 64, seed=0)
    texts = [tokenizer.bos_token + r["prompt"] for r in rows]
    ours = prompt_ids_for(rows, ByteTokenizer(), "raw")
    assert tokenizer(text=texts)["input_ids"] == ours, "TRL's prompt token ids differ from dsarl's"
    return datasets.Dataset.from_dict({"prompt": texts, "answer": [r["answer"] for r in rows]})


def run_case(init: Path, precision: str, steps: int, checkpointing: bool = False) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(init)
    # eager: what the interop tests compare with dsarl (tests/models/test_hf_interop.py)
    model = AutoModelForCausalLM.from_pretrained(init, attn_implementation="eager")
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-grpo-"), max_steps=steps, seed=0,
        per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,  # one generation per step
        num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0, beta=BETA, num_iterations=1,
        learning_rate=2e-4,  # grpo_step.py's learner (LearnerConfig's optim); TRL's default is 1e-6
        gradient_checkpointing=checkpointing,  # TRL's default is on; dsarl's learner does not recompute
        bf16=precision == "bf16", use_cpu=True, use_vllm=False, dataloader_num_workers=0,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True)
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=prompt_dataset(tokenizer),
                          processing_class=tokenizer, callbacks=[timer])
    timer.watch(trainer, "_generate", "_generate_and_score_completions")
    trainer.remove_callback(PrinterCallback)  # its per-step log dicts would crowd the JSON lines on stdout
    # bf16=True must mean bf16 autocast on this CPU, not a silent fp32 run
    assert trainer.accelerator.native_amp == (precision == "bf16"), f"autocast {trainer.accelerator.native_amp}"
    trainer.train()
    assert len(timer.times) == steps, f"{len(timer.times)} steps timed, {steps} run"
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    timed = timer.times[1:] if steps > 1 else timer.times
    parts = timer.parts[1:] if steps > 1 else timer.parts
    generate = [p.get("_generate", 0.0) for p in parts]
    scored = [p.get("_generate_and_score_completions", 0.0) for p in parts]
    # a TRL whose step no longer runs these two methods would give a split of zeros, not an error
    assert all(0 < g <= s for g, s in zip(generate, scored)), f"split not timed: {parts}"
    return {"bench": "trl_grpo_step", "precision": precision, "gradient_checkpointing": checkpointing,
            "prompts": PROMPTS, "group_size": GROUP,
            "new_tokens": NEW_TOKENS, "beta": BETA, "step_s": statistics.median(timed), "steps_s": timer.times,
            # the split, medians over the same steps: generate; the rewards and the reference forward; the rest
            # of the step (the policy's forward and backward, AdamW)
            "generate_s": statistics.median(generate),
            "reward_and_reference_s": statistics.median(s - g for s, g in zip(scored, generate)),
            "train_s": statistics.median(t - s for t, s in zip(timed, scored)),
            "completion_mean_length": statistics.mean(lengths) if lengths else None,
            "trl_version": trl.__version__, "transformers_version": transformers.__version__,
            "torch_version": torch.__version__, "model_params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16"],
                        help="bf16: GRPOConfig's default (bf16 autocast over fp32 weights); fp32: plain")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="TRL's default (GRPOConfig turns it on); off unless given, as dsarl's learner")
    args = parser.parse_args()
    torch.set_num_threads(2)  # what grpo_step.py gives each role in synchronous steps
    init = Path(tempfile.mkdtemp(prefix="bench-trl-grpo-init-")) / "model"
    save_pretrained(build_model(DSAConfig(**MODEL), seed=0), init)
    for precision in args.precision:
        print(json.dumps(run_case(init, precision, args.steps, args.gradient_checkpointing)), flush=True)


if __name__ == "__main__":
    main()
