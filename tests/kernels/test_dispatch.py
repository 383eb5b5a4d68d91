"""kernels/dispatch.py: one table per op, one rule, DSARL_KERNELS forcing every op."""
import os
import subprocess
import sys

import pytest
import torch

from dsarl import kernels
from dsarl.kernels import dispatch, native
from dsarl.kernels.dense_mla.reference import dense_mla_attention_reference
from dsarl.kernels.index_codec.reference import decode_rows_reference, encode_rows_reference
from dsarl.kernels.indexer_kl.reference import indexer_kl_loss_reference
from dsarl.kernels.indexer_scores.reference import indexer_scores_reference
from dsarl.kernels.sparse_mla.reference import sparse_mla_attention_reference
from dsarl.kernels.rowwise.reference import rms_norm_reference, swiglu_reference
from dsarl.kernels.topk.reference import topk_indices_reference
from dsarl.models import DSAConfig, StaticKVCache, build_model

REFERENCES = {"indexer_scores": indexer_scores_reference, "topk": topk_indices_reference,
              "sparse_mla": sparse_mla_attention_reference, "dense_mla": dense_mla_attention_reference,
              "indexer_kl": indexer_kl_loss_reference, "rms_norm": rms_norm_reference,
              "swiglu": swiglu_reference, "index_encode": encode_rows_reference,
              "index_decode": decode_rows_reference}
C_OPS = ("topk", "indexer_topk", "sparse_mla", "dense_mla", "rms_norm", "swiglu", "index_encode",
         "index_decode")  # CPU backend: a C kernel


def test_every_op_has_a_reference_and_only_known_backends():
    for op, table in dispatch.TABLES.items():
        assert "reference" in table and set(table) <= set(dispatch.BACKENDS), op
        for backend in table:
            if backend != "triton":  # importing a Triton file needs triton, resolved only when chosen
                assert callable(dispatch.implementation(op, backend)), (op, backend)
    for op, fn in REFERENCES.items():
        assert dispatch.implementation(op, "reference") is fn


def test_forced_reference_dispatches_every_op_to_its_reference(monkeypatch):
    monkeypatch.setenv("DSARL_KERNELS", "reference")
    x = torch.randn(2, 3, 4, 8)
    for op in dispatch.TABLES:
        assert dispatch.choose(op, x) is dispatch.implementation(op, "reference"), op


def test_unknown_backend_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("DSARL_KERNELS", "fast")
    with pytest.raises(ValueError, match="DSARL_KERNELS='fast'.*reference, cpu, triton"):
        kernels.topk_indices(torch.zeros(1, 2, 3), 2)


def test_forced_backend_an_op_lacks_runs_its_reference_and_one_that_cannot_run_is_an_error(monkeypatch):
    x = torch.randn(1, 4, 2, 8)
    monkeypatch.setenv("DSARL_KERNELS", "triton")
    assert dispatch.choose_backend("dense_mla", x) == "reference"  # no Triton kernel: the reference
    assert dispatch.choose_backend("topk", x[:, :, 0]) == "reference"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if dispatch.triton_available():  # Triton on a CPU tensor only under the interpreter
        with pytest.raises(RuntimeError, match="DSARL_KERNELS=triton for sparse_mla: .*TRITON_INTERPRET"):
            dispatch.choose_backend("sparse_mla", x)
    monkeypatch.setenv("DSARL_KERNELS", "cpu")
    assert dispatch.choose_backend("indexer_kl", x) == "reference"  # no CPU kernel: the reference
    assert dispatch.choose_backend("sparse_mla", x.double()) == "reference"  # fp64 (gradcheck): always


def test_default_on_cpu_chooses_the_c_kernels_when_a_compiler_exists(monkeypatch):
    monkeypatch.delenv("DSARL_KERNELS", raising=False)
    x = torch.randn(1, 4, 2, 8)
    has_c = native._compiler() is not None  # a compiler here: the C kernels must build, load and be chosen
    for op in C_OPS:
        assert dispatch.choose_backend(op, x) == ("cpu" if has_c else "reference"), op
    assert dispatch.choose_backend("indexer_scores", x) == "cpu"  # torch matmul tiles: no compiler needed
    assert dispatch.choose_backend("indexer_kl", x) == "reference"  # Triton only on CUDA


def _model_run(model, ids, cfg):
    """Sparse forward + backward, a dense forward, and cached decode steps (dense and sparse): every op
    the model dispatches. -> (logits and gradients, the (op, backend) choices made)."""
    model.zero_grad(set_to_none=True)
    with dispatch.record() as chosen:
        sparse = model(ids, attention="sparse").logits
        sparse.logsumexp(-1).mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            dense = model(ids, attention="dense").logits
            steps = []
            for attention in ("dense", "sparse"):
                cache = StaticKVCache(cfg, batch_size=ids.shape[0], max_len=ids.shape[1] + 2)
                model(ids, cache=cache, attention=attention)
                steps.append(model(ids[:, -1:], cache=cache, attention=attention).logits)
    return [sparse.detach(), dense, *steps, *grads], chosen


def test_model_under_forced_reference_runs_only_references_and_matches_the_default(monkeypatch):
    cfg = DSAConfig(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                    q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                    index_n_heads=3, index_head_dim=16, index_topk=5, index_chunk=7)
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, 264, (2, 19), generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("DSARL_KERNELS", "reference")
    ref, ref_chosen = _model_run(model, ids, cfg)
    assert {op for op, _ in ref_chosen} >= {"indexer_topk", "indexer_scores", "topk", "sparse_mla", "dense_mla",
                                            "dense_mha", "rms_norm", "swiglu"}
    assert {backend for _, backend in ref_chosen} == {"reference"}
    monkeypatch.delenv("DSARL_KERNELS")
    got, chosen = _model_run(model, ids, cfg)
    if native._compiler() is not None:  # the default really ran something else
        assert {("sparse_mla", "cpu"), ("indexer_topk", "cpu"), ("dense_mla", "cpu"), ("rms_norm", "cpu"),
                ("swiglu", "cpu")} <= set(chosen)
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max().clamp(min=1)


def test_a_cpu_only_process_never_imports_triton():
    # every op's dispatch sees a CPU tensor first: Triton (~70 MB, ~0.1 s a process) stays unimported
    code = ("import sys, torch\n"
            "from dsarl.models import DSAConfig, build_model, StaticKVCache\n"
            "cfg = DSAConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,"
            " q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,"
            " index_n_heads=2, index_head_dim=16, index_topk=4)\n"
            "m = build_model(cfg)\n"
            "ids = torch.randint(0, 256, (2, 20))\n"
            "m(ids, attention='sparse', collect_aux=True).logits.sum().backward()\n"
            "cache = StaticKVCache(cfg, 2, 24)\n"
            "with torch.no_grad():\n"
            "    m(ids, cache=cache, attention='sparse'); m(ids[:, -1:], cache=cache, attention='sparse')\n"
            "print('triton' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DSARL_KERNELS", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
