"""Packed documents with a document mask: each document's logits and gradients equal those of the
document run alone from position 0; the helpers on a hand-worked row; misuse is refused."""
import random

import pytest
import torch

from dsarl.models import DSAConfig, build_model
from dsarl.models.doc_mask import document_causal_mask, document_ids, document_positions
from fresh_seeds import fresh_seed

BOS = 1


def small_cfg() -> DSAConfig:
    return DSAConfig(vocab_size=264, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                     index_n_heads=2, index_head_dim=8, index_topk=4)


def test_helpers_on_a_hand_worked_row():
    ids = torch.tensor([[7, BOS, 5, 6, BOS, 9, 2, BOS, 4]])  # a token before the first bos: document 0
    docs = document_ids(ids, BOS)
    assert docs.tolist() == [[0, 1, 1, 1, 2, 2, 2, 3, 3]]
    assert document_positions(docs).tolist() == [[0, 0, 1, 2, 0, 1, 2, 0, 1]]
    mask = document_causal_mask(docs)[0]
    for t in range(9):
        for s in range(9):
            assert bool(mask[t, s]) == (s <= t and int(docs[0, s]) == int(docs[0, t])), (t, s)


def test_packed_row_equals_documents_run_alone():
    seed = fresh_seed()
    rng = random.Random(seed)
    model = build_model(small_cfg(), seed=seed)
    lens = [rng.randint(1, 9) for _ in range(4)]
    docs = [[BOS] + [rng.randrange(3, 264) for _ in range(n)] for n in lens]
    packed = torch.tensor([sum(docs, [])])
    out = model(packed, doc_ids=document_ids(packed, BOS)).logits[0]
    (out ** 2).sum().backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    start, alone_sum = 0, 0.0
    for d in docs:
        alone = model(torch.tensor([d])).logits[0]
        assert (out[start:start + len(d)] - alone).abs().max().item() <= 1e-5, f"seed {seed}"
        alone_sum = alone_sum + (alone ** 2).sum()
        start += len(d)
    alone_sum.backward()
    for n, p in model.named_parameters():
        if n in grads_packed:
            # fp32 sums in another order: measured ~1e-6 of the tensor's largest entry
            err = (grads_packed[n] - p.grad).abs().max().item()
            assert err <= 1e-4 * p.grad.abs().max().item() + 1e-9, f"{n}: {err}, seed {seed}"


def test_without_mask_a_later_document_sees_the_earlier_one():
    # the control: the equality above is the mask's doing, not the model's
    seed = fresh_seed()
    model = build_model(small_cfg(), seed=seed)
    a, b = [BOS, 10, 11, 12], [BOS, 20, 21]
    with torch.no_grad():
        plain = model(torch.tensor([a + b])).logits[0, len(a):]
        alone = model(torch.tensor([b])).logits[0]
    assert (plain - alone).abs().max().item() > 1e-4


@pytest.mark.parametrize("kw", [{"attention": "sparse"}, {"collect_aux": True},
                                {"positions": torch.arange(5)[None]}])
def test_doc_ids_refused_where_unsupported(kw):
    model = build_model(small_cfg(), seed=0)
    ids = torch.tensor([[BOS, 4, 5, BOS, 6]])
    with pytest.raises(ValueError, match="doc_ids"):
        model(ids, doc_ids=document_ids(ids, BOS), **kw)
