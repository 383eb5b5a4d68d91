"""examples/moe_dsa_grpo.py end to end, shortened: a tiny random DeepSeek-V3.2 MoE made by transformers, a BPE
tokenizer trained by `tokenizers` with a ChatML template in tokenizer_config.json, a `messages` JSONL, two GRPO
steps on Ray, then transformers generates from the result.

Checked against transformers itself: every rollout's prompt ids are AutoTokenizer.apply_chat_template of its
row's messages (without the reference reply, with the generation prompt); a completion ends at the tokenizer's
eos (<|im_end|>, from tokenizer_config.json) or at max_new_tokens; the saved checkpoint's tokenizer renders the
same chats in AutoTokenizer and in dsarl.
"""
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

ROOT = Path(__file__).resolve().parents[2]


def _import_installed_kernels() -> None:
    """As tests/models/conftest.py: transformers >= 5 imports Hugging Face's `kernels`, which our kernels/ folder
    would shadow with the repository root first on sys.path."""
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_import_installed_kernels()
transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

from dsarl.models import apply_chat_template, load_tokenizer  # noqa: E402

EXAMPLE = ROOT / "examples" / "moe_dsa_grpo.py"
MAX_NEW = 4


def load_example():
    spec = importlib.util.spec_from_file_location("moe_dsa_grpo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fresh_ray():
    yield
    ray.shutdown()


def test_example_runs_grpo_with_the_chat_template_and_transformers_generates(tmp_path, fresh_ray):
    example = load_example()
    out = tmp_path / "run"
    result = example.main(["--out", str(out), "steps=2", "prompts_per_step=3", "group_size=2", "eval_samples=3",
                           f"rollout.max_new_tokens={MAX_NEW}", "ray_num_cpus=2", "learner_num_cpus=0.5",
                           "rollout.num_cpus_per_worker=0.25"])
    lines = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2] and lines[2]["weight_version"] == 2

    auto = AutoTokenizer.from_pretrained(out / "init")
    assert auto.eos_token == "<|im_end|>" and auto.chat_template == example.CHAT_TEMPLATE
    eos = auto.eos_token_id
    for step in (1, 2):
        rows = pq.read_table(out / "grpo" / "rollouts" / f"step_{step:06d}.parquet").to_pylist()
        assert len(rows) == 3 * 2
        for r in rows:
            messages = json.loads(r["metadata"])["messages"]
            expected = auto.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
            assert r["prompt_token_ids"] == list(expected)
            ids = r["completion_token_ids"]
            assert (r["finish_reason"] == "stop" and ids[-1] == eos and eos not in ids[:-1]) or \
                   (r["finish_reason"] == "length" and len(ids) == MAX_NEW and eos not in ids)
            assert r["indices"] is not None  # sparse attention: the sampler's top-k selection was recorded

    final = Path(result["final"])
    saved, ours = AutoTokenizer.from_pretrained(final), load_tokenizer(final)
    chat = example.chat_rows(1, 7)[0]["messages"][:2]
    assert apply_chat_template(ours, chat) == list(saved.apply_chat_template(chat, add_generation_prompt=True,
                                                                            tokenize=True, return_dict=False))
    assert isinstance(result["reply"], str)
