"""A config the run would fail on is a config error before any actor starts (launch/preflight.py).

Each test runs the real `dsarl` entry in-process on a config with one fault and checks: exit status 2,
the message (the config file, the key, the value or file at fault) and that Ray was never started.
Found after `init_ray`, each of these was a traceback from inside an actor wrapped in the driver's.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import ray
import yaml

from dsarl.launch.cli import main
from dsarl.launch.config import load_config
from dsarl.launch.grpo_loop import GRPOConfig
from dsarl.launch.preflight import check_distill_config, check_grpo_config, check_pipeline_config
from dsarl.models import DSAConfig, build_model, save_pretrained
from dsarl.rewards.registry import BUILTIN_REWARDS
from dsarl.rewards.rubric import default_rubric_dir


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    cfg = DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=4)
    return str(save_pretrained(build_model(cfg, seed=0), tmp_path_factory.mktemp("ckpt") / "tiny"))


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def grpo_cfg(tmp_path, ckpt, **changes) -> dict:
    """A GRPO config that passes every check; `changes` replace its top-level keys. One short step, so
    that where a check is missing the run ends soon instead of training on."""
    return {"init_from": ckpt, "run_dir": str(tmp_path / "run"), "steps": 1, "prompts_per_step": 2, "group_size": 2,
            "eval_samples": 2, "ray_num_cpus": 2, "tensorboard": False,
            "rollout": {"num_cpus_per_worker": 0.25, "max_new_tokens": 4},
            "data": {"task": "arithmetic", "num_train": 16, "num_test": 8},
            "rewards": {"components": [{"name": "math_answer"}]}, "accuracy_component": "math_answer",
            **changes}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_error(argv: list[str], capsys) -> str:
    """Runs `dsarl ARGV`; -> its one-line error, after checking exit status 2 and that Ray never started."""
    assert main(argv) == 2
    assert not ray.is_initialized()
    err = capsys.readouterr().err
    assert err.startswith("dsarl: config error: ") and err.count("\n") == 1, err
    return err[len("dsarl: config error: "):].rstrip("\n")


def grpo_error(tmp_path, capsys, cfg: dict, *extra: str) -> tuple[Path, str]:
    path = write_yaml(tmp_path / "grpo.yaml", cfg)
    return path, config_error(["grpo", str(path), *extra], capsys)


def test_a_config_that_passes_starts_nothing_and_raises_nothing(tmp_path, ckpt):
    cfg = load_config(GRPOConfig, "configs/grpo_tiny.yaml", [f"init_from={ckpt}", f"run_dir={tmp_path}"])
    check_grpo_config(cfg, lambda p: p)
    assert not ray.is_initialized()


# ---- rewards ------------------------------------------------------------------------------------
def test_an_unknown_reward_name_names_the_component(tmp_path, ckpt, capsys):
    comps = [{"name": "math_answer"}, {"name": "math_answr", "weight": 0.5}]
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, rewards={"components": comps}))
    assert err == (f"{path}: rewards.components[1] (math_answr): reward name 'math_answr' is neither a built-in "
                   f"({sorted(BUILTIN_REWARDS)}) nor a 'module:function' or 'file.py:function' path")


def test_a_reward_module_that_does_not_import_names_the_component(tmp_path, ckpt, capsys):
    comps = [{"name": "no_such_pkg.rewards:brevity"}, {"name": "math_answer"}]
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, rewards={"components": comps}))
    assert err.startswith(f"{path}: rewards.components[0] (no_such_pkg.rewards:brevity): "
                          "'no_such_pkg.rewards:brevity': cannot import module 'no_such_pkg.rewards': "
                          "No module named 'no_such_pkg'")


def test_a_reward_kwarg_the_reward_does_not_take_names_the_component_and_the_kwarg(tmp_path, ckpt, capsys):
    comps = [{"name": "math_answer", "kwargs": {"answer_kye": "answer"}}]
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, rewards={"components": comps}))
    # the part after the key is the registry's wording (validate_reward_config once it lands)
    assert err.startswith(f"{path}: rewards.components[0] (math_answer): ") and "'answer_kye'" in err


def test_a_class_reward_missing_a_required_kwarg_is_caught_without_building_it(tmp_path, ckpt, capsys):
    comps = [{"name": "math_answer"}, {"name": "overlong", "kwargs": {"max_len": 8}}]
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, rewards={"components": comps}))
    assert err.startswith(f"{path}: rewards.components[1] (overlong): ") and "'buffer'" in err


def test_an_accuracy_component_that_is_not_a_reward_key(tmp_path, ckpt, capsys):
    comps = [{"name": "math_answer", "label": "correct"}]
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, rewards={"components": comps}))
    assert err == (f"{path}: accuracy_component: 'math_answer' is not a reward component's key (configured: "
                   "['correct']); name one of them or its '<key>/<sub-score>'")


# ---- data ---------------------------------------------------------------------------------------
def test_a_missing_data_file(tmp_path, ckpt, capsys):
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, data={"path": str(tmp_path / "train.jsonl")}))
    assert err == f"{path}: data.path: {tmp_path / 'train.jsonl'}: no such file or directory"


def test_a_missing_test_file(tmp_path, ckpt, capsys):
    train = write_rows(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    data = {"path": str(train), "test_path": "held_out.jsonl"}
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, data=data))
    assert err.startswith(f"{path}: data.test_path: held_out.jsonl: no such file or directory")


def test_a_data_file_without_a_prompt_column(tmp_path, ckpt, capsys):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"question": "2+2=", "answer": "4"}]
    train = write_rows(tmp_path / "train.jsonl", rows)
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, data={"path": str(train)}))
    assert err == (f"{path}: data.path: {train}: row 1: no 'prompt' column (data.prompt_key; "
                   f"columns: ['answer', 'question'])")


def test_a_data_file_without_the_column_a_reward_reads(tmp_path, ckpt, capsys):
    train = write_rows(tmp_path / "train.jsonl", [{"prompt": "1+1=", "gold": "2"}])
    comps = [{"name": "math_answer"}, {"name": "exact_match", "kwargs": {"answer_key": "gold"}}]
    cfg = grpo_cfg(tmp_path, ckpt, data={"path": str(train)}, rewards={"components": comps})
    path, err = grpo_error(tmp_path, capsys, cfg)
    assert err == (f"{path}: rewards.components[0] (math_answer) reads column 'answer' (answer_key), which row 0 "
                   f"of {train} (split 'train') lacks (columns: ['gold', 'prompt'])")


# ---- rubrics ------------------------------------------------------------------------------------
def test_a_row_naming_a_rubric_that_does_not_exist(tmp_path, ckpt, capsys):
    train = write_rows(tmp_path / "train.jsonl", [{"prompt": "hi", "rubric": "polite_reply"},
                                                  {"prompt": "sum?", "rubric": "concise_maths"}])
    cfg = grpo_cfg(tmp_path, ckpt, data={"path": str(train)}, rewards={"components": [{"name": "rubric"}]},
                   accuracy_component="rubric")
    path, err = grpo_error(tmp_path, capsys, cfg)
    assert err == (f"{path}: rewards.components[0] (rubric): row 1 of {train} (split 'train'): rubric id 'concise_maths': "
                   f"no file {default_rubric_dir() / 'concise_maths.yaml'}")


def test_a_rubric_kwarg_that_does_not_exist(tmp_path, ckpt, capsys):
    comps = [{"name": "math_answer"}, {"name": "rubric", "kwargs": {"rubric": "no_such_rubric"}}]
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, rewards={"components": comps}))
    assert err == (f"{path}: rewards.components[1] (rubric): kwargs.rubric: rubric id 'no_such_rubric': "
                   f"no file {default_rubric_dir() / 'no_such_rubric.yaml'}")


def test_a_rubric_with_judge_criteria_needs_a_judge(tmp_path, ckpt, capsys):
    rubrics = tmp_path / "rubrics"
    rubrics.mkdir()
    write_yaml(rubrics / "judged.yaml", {"criteria": [{"name": "short", "check": "regex", "pattern": "^.{0,40}$"},
                                                      {"name": "sound", "check": "judge", "question": "Valid?"}]})
    comps = [{"name": "math_answer"}, {"name": "rubric", "kwargs": {"rubric": "judged", "rubric_dir": str(rubrics)}}]
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, rewards={"components": comps}))
    assert err == (f"{path}: rewards.components[1] (rubric): rubric(s) ['judged'] have judge criteria but no judge "
                   "is configured: set kwargs.judge to a 'module:factory' that builds the judge engine")
    comps[1]["kwargs"]["judge"] = "no_such_pkg.judges:make"
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, rewards={"components": comps}))
    assert err.startswith(f"{path}: rewards.components[1] (rubric): kwargs.judge: 'no_such_pkg.judges:make': "
                          "cannot import module 'no_such_pkg.judges': No module named 'no_such_pkg'")


def test_rows_naming_shipped_rubrics_pass_with_a_judge_named_not_built(tmp_path, ckpt):
    train = write_rows(tmp_path / "train.jsonl", [{"prompt": "hi", "rubric": "polite_reply"},
                                                  {"prompt": "sum?", "rubric": "concise_math"}])  # a judge criterion
    judge = {"judge": "dsarl.actors.engine.judge:native_judge", "judge_kwargs": {"checkpoint_dir": ckpt}}
    cfg = load_config(GRPOConfig, write_yaml(tmp_path / "ok.yaml", grpo_cfg(
        tmp_path, ckpt, data={"path": str(train)}, rewards={"components": [{"name": "rubric", "kwargs": judge}]},
        accuracy_component="rubric")))
    check_grpo_config(cfg)
    assert not ray.is_initialized()


# ---- checkpoints --------------------------------------------------------------------------------
def test_init_from_that_is_not_a_checkpoint(tmp_path, ckpt, capsys):
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, init_from=str(tmp_path / "nope")))
    assert err == f"{path}: init_from: no checkpoint directory {tmp_path / 'nope'}"
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt, init_from=str(half)))
    assert err == f"{path}: init_from: {half} is not a complete checkpoint (missing model.safetensors)"


def test_resume_with_no_checkpoint_in_run_dir_says_so(tmp_path, ckpt, capsys):
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt), "--resume")
    run_dir = tmp_path / "run"
    assert err == (f"{path}: --resume: no checkpoint in run_dir {run_dir} (looked for {run_dir / 'checkpoints'}"
                   "/step_*); drop --resume to start afresh, or pass --resume CHECKPOINT")


def test_resume_from_a_path_that_is_not_a_training_checkpoint(tmp_path, ckpt, capsys):
    # a model checkpoint (init_from) has no optimizer or trainer state to continue from
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt), "--resume", ckpt)
    assert err == f"{path}: --resume: {ckpt} is not a complete checkpoint (missing optimizer.pt, trainer_state.json)"


# ---- optional packages --------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_the_vllm_engine_without_vllm_names_the_extra(tmp_path, ckpt, capsys):
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt), "rollout.engine=vllm")
    assert err == (f"{path}: rollout.engine: vllm needs the package 'vllm', which is not installed: "
                   'pip install "dsarl[vllm]"')


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_logging_without_wandb_names_the_extra(tmp_path, ckpt, capsys):
    path, err = grpo_error(tmp_path, capsys, grpo_cfg(tmp_path, ckpt), "wandb_project=dsarl-a")
    assert err == (f"{path}: wandb_project: 'dsarl-a' needs the package 'wandb', which is not installed: "
                   'pip install "dsarl[logging]"')


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_mlflow_logging_in_pretrain_without_mlflow_names_the_extra(tmp_path, capsys):
    err = config_error(["pretrain", "configs/pretrain_tiny.yaml", f"run_dir={tmp_path}", "mlflow_experiment=a"],
                       capsys)
    assert err == ("mlflow_experiment: 'a' needs the package 'mlflow', which is not installed: "
                   'pip install "dsarl[logging]"')
    assert not (tmp_path / "config.yaml").exists()


# ---- pipelines ----------------------------------------------------------------------------------
def test_the_shipped_pipeline_configs_pass(tmp_path):
    from dsarl.launch.distill_pipeline import DistillConfig
    from dsarl.launch.quickstart import PipelineConfig

    check_pipeline_config(load_config(PipelineConfig, "configs/quickstart.yaml", [f"run_dir={tmp_path / 'q'}"]))
    check_distill_config(load_config(DistillConfig, "configs/distill.yaml", [f"run_dir={tmp_path / 'd'}"]))
    assert not ray.is_initialized()


def test_quickstart_checks_its_grpo_part_before_pretraining(tmp_path, capsys):
    err = config_error(["run", "configs/quickstart.yaml", f"run_dir={tmp_path}", "grpo.accuracy_component=acc"],
                       capsys)
    assert err.startswith("configs/quickstart.yaml: grpo.accuracy_component: 'acc' is not a reward component's key")
    assert not (tmp_path / "pretrain").exists()


def test_quickstart_resume_with_nothing_in_run_dir(tmp_path, capsys):
    err = config_error(["run", "configs/quickstart.yaml", f"run_dir={tmp_path}", "--resume"], capsys)
    assert err.startswith(f"configs/quickstart.yaml: --resume: nothing to resume in run_dir {tmp_path} (none of ")


def test_distill_checks_domains_base_and_each_specialist(tmp_path, ckpt, capsys):
    base = ["distill", "configs/distill.yaml", f"run_dir={tmp_path}"]
    err = config_error([*base, "domains.1.name=cooking"], capsys)
    assert err.startswith("configs/distill.yaml: domains[1].name: unknown domain 'cooking'; registered: ")
    err = config_error([*base, f"base={tmp_path / 'nope'}"], capsys)
    assert err == f"configs/distill.yaml: base: no checkpoint directory {tmp_path / 'nope'}"
    err = config_error([*base, f"base={ckpt}", "domains.0.grpo_overrides=[accuracy_component=correct]"], capsys)
    assert err.startswith("configs/distill.yaml: domains[0] (math) specialist: accuracy_component: 'correct' is not "
                          "a reward component's key")
    err = config_error([*base, f"base={ckpt}", "--resume", ckpt], capsys)
    assert err.startswith(f"configs/distill.yaml: --resume {ckpt}: a pipeline resumes from its run_dir")


def test_vllm_with_index_replay_on_a_sparse_model_is_refused(ckpt):
    from dsarl.launch.config import load_config
    from dsarl.launch.grpo_loop import GRPOConfig
    from dsarl.launch.preflight import check_engine_replay
    from dsarl.models.config import ConfigError

    sparse_vllm = ["rollout.engine=vllm", "model_overrides={attention: sparse}"]
    with pytest.raises(ConfigError, match="vllm returns no indexer selections"):
        check_engine_replay(load_config(GRPOConfig, None, sparse_vllm), ckpt)
    check_engine_replay(load_config(GRPOConfig, None, [*sparse_vllm, "learner.use_sampler_indices=false"]), ckpt)
    check_engine_replay(load_config(GRPOConfig, None, ["rollout.engine=vllm"]), ckpt)  # the checkpoint is dense


def test_vllm_with_routing_replay_on_a_moe_model_is_refused(tmp_path):
    import json

    from dsarl.launch.config import load_config
    from dsarl.launch.grpo_loop import GRPOConfig
    from dsarl.launch.preflight import check_engine_replay
    from dsarl.models.config import ConfigError

    moe = DSAConfig(vocab_size=264, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                    index_n_heads=2, index_head_dim=16, index_topk=4, n_routed_experts=4, n_group=1, topk_group=1,
                    num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1)
    (tmp_path / "config.json").write_text(json.dumps(moe.to_dict()))
    with pytest.raises(ConfigError, match="vllm returns no expert routing"):
        check_engine_replay(load_config(GRPOConfig, None, ["rollout.engine=vllm"]), str(tmp_path))
    check_engine_replay(load_config(GRPOConfig, None, ["rollout.engine=vllm", "learner.use_sampler_experts=false"]),
                        str(tmp_path))
