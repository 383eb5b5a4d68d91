"""A rubric's judge criterion scored by a real DSA model through the native engine."""
import torch
import yaml

from dsarl.models import DSAConfig, build_model, save_pretrained
from dsarl.rewards.rubric import JUDGE_TEMPLATE, RubricReward
from dsarl.rewards.types import RewardSample


def p_yes_by_full_forwards(model, tok, prompt: str) -> float:
    """Independent reference: sum over the target strings of the product of next-byte probabilities."""
    total = 0.0
    base = tok.encode(prompt, add_bos=True)
    for target in ("yes", "Yes", " yes", " Yes"):
        ids = base + tok.encode(target)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        n = len(base)
        total += float(torch.exp(sum(logp[n - 1 + j, ids[n + j]] for j in range(len(target)))))
    return total


def test_rubric_judge_criterion_is_the_models_probability_of_yes(tmp_path):
    cfg = DSAConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=8)
    model = build_model(cfg, seed=5)
    save_pretrained(model, tmp_path / "judge")
    rubric = {"id": "r", "criteria": [
        {"name": "has_number", "weight": 1.0, "check": "regex", "pattern": r"\d"},
        {"name": "sound", "weight": 3.0, "check": "judge", "question": "Is it right?"},
    ]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rubric))
    reward = RubricReward(rubric="r", rubric_dir=str(tmp_path), judge="dsarl.actors.engine.judge:native_judge",
                          judge_kwargs={"checkpoint_dir": str(tmp_path / "judge")})
    sample = RewardSample(prompt="2+2=", completion="4", num_tokens=1, row={})
    out = reward(sample)
    from dsarl.models import ByteTokenizer

    prompt = JUDGE_TEMPLATE.format(prompt=sample.prompt, completion=sample.completion, question="Is it right?")
    p = p_yes_by_full_forwards(model, ByteTokenizer(), prompt)
    score = out["score"] if isinstance(out, dict) else out
    assert abs(score - (1.0 * 1.0 + 3.0 * p) / 4.0) <= 1e-5
