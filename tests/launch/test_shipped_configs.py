"""Every config shipped in configs/ loads into its schema: a renamed field or a typo in a shipped file
fails here, not minutes into a user's run."""
import pytest

from dsarl.launch.config import PACKAGE_CONFIGS, load_config


def _schemas():
    from dsarl.launch.distill_pipeline import DistillConfig
    from dsarl.launch.grpo_loop import GRPOConfig
    from dsarl.launch.quickstart import PipelineConfig
    from dsarl.launch.stage_conversion import EvalConfig
    from dsarl.learner.conversion import SparseConfig, WarmupConfig
    from dsarl.learner.pretrain import PretrainConfig

    return {
        "conversion/pretrain_short.yaml": PretrainConfig, "conversion/pretrain_long.yaml": PretrainConfig,
        "conversion/warmup.yaml": WarmupConfig, "conversion/sparse.yaml": SparseConfig,
        "conversion/eval.yaml": EvalConfig, "conversion/eval_parity.yaml": EvalConfig,
        "pretrain_tiny.yaml": PretrainConfig, "grpo_tiny.yaml": GRPOConfig, "quickstart.yaml": PipelineConfig,
        "distill.yaml": DistillConfig, "examples/moe_dsa_grpo.yaml": GRPOConfig,
        "examples/long_context_grpo.yaml": GRPOConfig,
    }


def test_every_stage_config_is_listed():
    listed = set(_schemas())
    shipped = {str(p.relative_to(PACKAGE_CONFIGS)) for p in PACKAGE_CONFIGS.rglob("*.yaml")}
    stage_configs = {p for p in shipped if not p.startswith(("models/", "rubrics/"))}
    assert stage_configs == listed  # a new stage config must be added to the table above


@pytest.mark.parametrize("name", sorted(_schemas()))
def test_shipped_config_loads(name):
    cfg = load_config(_schemas()[name], PACKAGE_CONFIGS / name)
    assert type(cfg).__name__ == _schemas()[name].__name__


@pytest.mark.parametrize("name", sorted(str(p.relative_to(PACKAGE_CONFIGS)) for p in PACKAGE_CONFIGS.rglob("*.yaml")
                                        if p.parent.name in ("models", "rubrics")))
def test_shipped_models_and_rubrics_load(name):
    from dsarl.models import DSAConfig
    from dsarl.rewards.rubric import load_rubric

    path = PACKAGE_CONFIGS / name
    if name.startswith("models/"):
        assert DSAConfig.from_file(path).num_hidden_layers > 0
    else:
        assert load_rubric(path).criteria
