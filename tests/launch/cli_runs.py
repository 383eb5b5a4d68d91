"""A tiny `dsarl grpo` run as a user starts it: a checkpoint, a YAML config, the CLI in a child process."""
import os
import subprocess
import sys
from pathlib import Path

from dsarl.models import DSAConfig, build_model, save_pretrained


def write_tiny_run(tmp_path: Path, steps: int = 3, extra: str = "",
                   rewards: str = "{num_cpus_per_worker: 0.25, components: [{name: math_answer}]}") -> Path:
    """A random tiny DSA checkpoint and a GRPO config for it; returns the config's path."""
    cfg = DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=4)
    save_pretrained(build_model(cfg, seed=0), tmp_path / "init")
    config = tmp_path / "grpo.yaml"
    config.write_text(f"""
init_from: {tmp_path / 'init'}
run_dir: {tmp_path / 'run'}
data: {{task: arithmetic, task_kwargs: {{max_digits: 1}}, num_train: 32, num_test: 4}}
rollout: {{num_cpus_per_worker: 0.25, max_new_tokens: 8, max_batch_size: 16}}
rewards: {rewards}
learner_num_cpus: 0.5
steps: {steps}
prompts_per_step: 4
group_size: 4
eval_samples: 4
tensorboard: false
{extra}
""")
    return config


def start_cli(*args: str) -> subprocess.Popen:
    """`dsarl ARGS` in a child process with a user's environment (no RAY_* variables of the test's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.Popen([sys.executable, "-m", "dsarl.launch", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
