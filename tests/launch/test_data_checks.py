"""Prompt data checked when it is loaded (issue #21 items 6 and 8), not at the step that first samples a row.

The bad files are real files written here. Through the real `dsarl grpo` entry: each fault is a config error
(exit status 2, Ray never started) naming the config file, the data file, the row and what is wrong. Then a
real GRPO run shows what data.overlong: skip | truncate give instead of a crash: the run trains, counts the
rows, and truncated prompts are the last tokens of the full ones.
"""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml

from dsarl.launch.cli import main
from dsarl.launch.grpo_loop import GRPOConfig, PromptData, RolloutConfig, run_grpo
from dsarl.models import ByteTokenizer, DSAConfig, build_model, save_pretrained
from dsarl.rewards.config import RewardComponentConfig, RewardConfig

CONTEXT, NEW_TOKENS = 64, 4  # the checkpoint's max_position_embeddings, rollout.max_new_tokens
LIMIT = CONTEXT - NEW_TOKENS  # the longest prompt that fits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    cfg = DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=4, max_position_embeddings=CONTEXT)
    return str(save_pretrained(build_model(cfg, seed=0), tmp_path_factory.mktemp("ckpt") / "tiny"))


def grpo_cfg(tmp_path: Path, ckpt: str, data: dict) -> dict:
    return {"init_from": ckpt, "run_dir": str(tmp_path / "run"), "steps": 1, "prompts_per_step": 2, "group_size": 2,
            "eval_samples": 2, "ray_num_cpus": 2, "tensorboard": False,
            "rollout": {"num_cpus_per_worker": 0.25, "max_new_tokens": NEW_TOKENS}, "data": data,
            "rewards": {"components": [{"name": "math_answer"}]}, "accuracy_component": "math_answer"}


def grpo_error(tmp_path: Path, capsys, cfg: dict) -> tuple[Path, str]:
    """Runs `dsarl grpo CONFIG`; -> (the config's path, its one-line error), after checking exit status 2
    and that Ray never started."""
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["grpo", str(path)]) == 2
    assert not ray.is_initialized()
    err = capsys.readouterr().err
    assert err.startswith("dsarl: config error: ") and err.count("\n") == 1, err
    return path, err[len("dsarl: config error: "):].rstrip("\n")


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LONG = "7*" * 40 + "1="  # 82 characters: 83 byte-tokenizer tokens with bos, more than LIMIT


# ---- item 8: rows that cannot be read or prompted with ------------------------------------------------
def test_bytes_that_are_not_utf8_name_the_file_and_row(tmp_path, ckpt, capsys):
    train = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "1+1=", "answer": "2"}).encode() + b"\n"
    bad = b'{"prompt": "caf\xe9=", "answer": "2"}\n'  # latin-1, as a spreadsheet export writes it
    train.write_bytes(good + b"\n" + good + bad)  # a blank line: row 2 is line 4
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, {"path": str(train)}))
    offset = 2 * len(good) + 1 + bad.index(b"\xe9")
    assert err == (f"{path}: data.path: {train}: row 2 (line 4): not valid UTF-8: byte 0xe9 at offset {offset} "
                   f"(invalid continuation byte)")


def test_a_lone_surrogate_names_the_file_row_and_column(tmp_path, ckpt, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+\\ud800=", "answer": "4"}\n')
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, {"path": str(train)}))
    assert err == (f"{path}: data.path: {train}: row 1['prompt']: not valid Unicode text: a lone surrogate U+D800 "
                   f"at character 2 (a JSON \\ud800 escape with no pair?)")


def test_a_null_prompt_names_the_file_and_row(tmp_path, ckpt, capsys):
    train = write_lines(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": None, "answer": "4"}])
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, {"path": str(train)}))
    assert err == f"{path}: data.path: {train}: row 1: the prompt ('prompt', data.prompt_key) is null"


def test_a_number_as_prompt_names_its_type(tmp_path, ckpt, capsys):
    train = write_lines(tmp_path / "train.jsonl", [{"prompt": 12, "answer": "2"}])
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, {"path": str(train)}))
    assert err == (f"{path}: data.path: {train}: row 0['prompt']: expected a string or a list of {{role, content}} "
                   f"messages, got int 12")


def test_a_chat_message_without_string_content_names_the_message(tmp_path, ckpt, capsys):
    rows = [{"messages": [{"role": "user", "content": "1+1="}], "answer": "2"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": None}], "answer": "4"}]
    train = write_lines(tmp_path / "train.jsonl", rows)
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, {"path": str(train), "prompt_key": "messages"}))
    assert err == f"{path}: data.path: {train}: row 1['messages'][1]['content']: expected a string, got None"


def test_an_empty_file_is_refused_before_step_one(tmp_path, ckpt, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("")  # once a ZeroDivisionError in step 1
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, {"path": str(train)}))
    assert err == f"{path}: data.path: {train} (split 'train') has no rows"


# ---- item 6: prompts longer than the model's context ---------------------------------------------------
def test_a_prompt_longer_than_the_context_names_the_file_row_and_length(tmp_path, ckpt, capsys):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": LONG, "answer": "7"}]
    train = write_lines(tmp_path / "train.jsonl", rows)
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, {"path": str(train)}))
    n = 1 + len(LONG.encode())  # bos + one token per byte
    assert err == (f"{path}: data: {train} (split 'train'): row 1: the prompt is {n} tokens, more than the {LIMIT} "
                   f"that fit the model's context with rollout.max_new_tokens (1 row(s) too long); shorten them, or "
                   f"set data.overlong: skip | truncate")


def test_skip_with_every_row_too_long_is_refused(tmp_path, ckpt, capsys):
    train = write_lines(tmp_path / "train.jsonl", [{"prompt": LONG, "answer": "7"}])
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, {"path": str(train), "overlong": "skip"}))
    assert err == f"{path}: data.overlong: skip: all 1 rows of {train} (split 'train') are longer than {LIMIT} tokens"


def small_run(ckpt: str, tmp_path: Path, train: Path, overlong: str) -> GRPOConfig:
    return GRPOConfig(
        init_from=ckpt, run_dir=str(tmp_path / overlong), steps=1, prompts_per_step=3, group_size=2, save_every=1,
        data=PromptData(path=str(train), overlong=overlong),
        rollout=RolloutConfig(num_cpus_per_worker=0.25, max_new_tokens=NEW_TOKENS, max_batch_size=8),
        rewards=RewardConfig(components=[RewardComponentConfig(name="math_answer")], num_cpus_per_worker=0.25),
        learner_num_cpus=0.5, eval_samples=0, tensorboard=False)


@pytest.mark.parametrize("overlong", ["skip", "truncate"])
def test_overlong_rows_are_skipped_or_truncated_and_counted_in_a_real_run(ray_local, ckpt, tmp_path, overlong):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": LONG, "answer": "7"}, {"prompt": "2+2=", "answer": "4"}]
    train = write_lines(tmp_path / "train.jsonl", rows)
    run_grpo(small_run(ckpt, tmp_path, train, overlong), show_progress=False)  # once a crash in step 1
    (metrics,) = [m for m in map(json.loads, (tmp_path / overlong / "metrics.jsonl").read_text().splitlines())
                  if m["step"] == 1]
    assert metrics[f"data/overlong_{'skipped' if overlong == 'skip' else 'truncated'}"] == 1.0
    assert metrics[f"data/overlong_{'truncated' if overlong == 'skip' else 'skipped'}"] == 0.0
    logged = pq.read_table(tmp_path / overlong / "rollouts" / "step_000001.parquet").to_pylist()
    prompts = {tuple(r["prompt_token_ids"]) for r in logged}
    full = ByteTokenizer().encode(LONG, add_bos=True)
    if overlong == "skip":
        assert len(prompts) == 2 and tuple(full) not in prompts and all(len(p) == 5 for p in prompts)
    else:  # left truncation: the prompt's last LIMIT tokens, its bos and start cut
        assert len(prompts) == 3 and tuple(full[-LIMIT:]) in prompts
