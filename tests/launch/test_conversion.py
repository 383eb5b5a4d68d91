"""The conversion path through the CLI, shortened: pretrain -> warmup -> sparse -> eval on a small model,
with the metrics each stage must log, the checkpoints' attention mode, resume, and config errors."""
import json

import pytest
import torch

from dsarl.launch.cli import main
from dsarl.learner.metrics import read_metrics
from dsarl.models import from_pretrained

MODEL = """vocab_size: 264
hidden_size: 64
intermediate_size: 96
num_hidden_layers: 2
num_attention_heads: 2
q_lora_rank: 32
kv_lora_rank: 16
qk_nope_head_dim: 8
qk_rope_head_dim: 8
v_head_dim: 8
index_n_heads: 2
index_head_dim: 16
index_topk: 16
"""
# the shipped pretraining mixes passkey and copy documents: shrink both parts, keep the mixture
PRETRAIN_TASK = ["task.kwargs.parts.passkey_multi_query.kwargs.context_len=40",
                 "task.kwargs.parts.passkey_multi_query.kwargs.n_needles=3",
                 "task.kwargs.parts.repeat_copy.kwargs.length=20", "task.kwargs.parts.repeat_copy.kwargs.min_length=8",
                 "batch_size=2", "seq_len=64", "tensorboard=false"]
TASK = ["task.name=passkey_multi_query", "task.kwargs.context_len=40", "task.kwargs.min_context_len=20",
        "task.kwargs.n_needles=3", "task.non_answer_weight=0.1", "batch_size=2", "seq_len=64", "tensorboard=false"]


def test_pretrain_warmup_sparse_eval_through_the_cli(tmp_path):
    (tmp_path / "m.yaml").write_text(MODEL)
    pre, warm, sparse, ev = (str(tmp_path / n) for n in ("pre", "warm", "sparse", "eval"))
    assert main(["pretrain", "configs/conversion/pretrain_short.yaml", f"model.config={tmp_path}/m.yaml", "steps=3",
                 f"run_dir={pre}", *PRETRAIN_TASK]) == 0
    assert main(["warmup", "configs/conversion/warmup.yaml", f"model.init_from={pre}/final", "steps=2",
                 "chunk=16", "diag_topk=4", "diag_every=1", "save_every=1", f"run_dir={warm}", *TASK]) == 0
    m = read_metrics(warm)
    assert [r["step"] for r in m] == [1, 2]
    assert all(k in m[-1] for k in ("indexer_kl", "recall", "recall_long", "fp8_topk_overlap", "step_time_s"))
    a, _ = from_pretrained(f"{pre}/final")
    b, _ = from_pretrained(f"{warm}/final")
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb) == (".indexer." not in n), n
    # resume from the step-1 checkpoint reproduces the uninterrupted run
    assert main(["warmup", "configs/conversion/warmup.yaml", f"model.init_from={pre}/final", "steps=2",
                 "chunk=16", "diag_topk=4", "save_every=1", f"run_dir={warm}", *TASK, "--resume"]) == 0
    c, _ = from_pretrained(f"{warm}/final")
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), c.state_dict().values()))

    assert main(["sparse", "configs/conversion/sparse.yaml", f"model.init_from={warm}/final",
                 "model.overrides.index_topk=8", "steps=2", "chunk=16", f"run_dir={sparse}", *TASK]) == 0
    m = read_metrics(sparse)
    assert all(k in m[-1] for k in ("loss", "indexer_kl", "recall", "fp8_topk_overlap")) and m[-1]["recall"] < 1
    s, _ = from_pretrained(f"{sparse}/final")
    assert s.config.attention == "sparse" and s.config.index_topk == 8

    assert main(["eval", "configs/conversion/eval.yaml", f"models=[{{label: s, checkpoint: {sparse}/final, "
                 "modes: [sparse, dense, random]}]", "context_lens=[40,80]", "n=2", "index_topk=8",
                 f"run_dir={ev}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["context_len"]) for r in rows] == [(md, L) for md in ("sparse", "dense", "random")
                                                             for L in (40, 80)]
    assert "acc@80" in (tmp_path / "eval" / "eval.md").read_text()


def test_conversion_config_typo_names_key_and_file(capsys):
    assert main(["warmup", "configs/conversion/warmup.yaml", "optim.lrr=3"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_conversion_stages_refuse_document_masking():
    for stage, cfg in (("warmup", "configs/conversion/warmup.yaml"), ("sparse", "configs/conversion/sparse.yaml")):
        with pytest.raises(ValueError, match="doc_mask"):
            main([stage, cfg, "task.doc_mask=true"])
