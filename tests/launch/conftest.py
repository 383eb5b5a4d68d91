"""Fixtures the real-Ray GRPO tests share: a local Ray instance per module, a tiny random checkpoint."""
import pytest
import ray

from dsarl.models import DSAConfig, build_model, save_pretrained


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    cfg = DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=4)
    path = tmp_path_factory.mktemp("init") / "ckpt"
    save_pretrained(build_model(cfg, seed=0), path)
    return str(path)
