"""Multi-query retrieval documents, the answer mask of the packing, and the answer-weighted LM loss,
checked against hand-built strings and a hand-written weighted mean."""
import random

import pytest
import torch
import torch.nn.functional as F

from dsarl.data.datasets import packed_lm_batch
from dsarl.data.retrieval_docs import (encode_document, kv_multi_query, lm_batch, loss_weights, passkey_multi_query,
                                       packed_lm_batch_with_mask)
from dsarl.learner.pretrain import TaskSpec, lm_loss, weighted_lm_loss
from dsarl.models import ByteTokenizer
from fresh_seeds import fresh_seed


def test_multi_query_document_answers_every_query_from_its_context():
    segs = kv_multi_query(random.Random(0), context_len=70, key_len=3, value_len=2, n_queries=12)
    context = segs[0][0]
    pairs = dict(p.split(":") for p in context.split(" "))
    assert len(pairs) == 70 // 7 == 10 and all(len(k) == 3 and len(v) == 2 for k, v in pairs.items())
    queries = segs[1:-1]
    assert len(queries) == 24 and segs[-1] == ("\n", False)
    asked = []
    for (q, q_ans), (v, v_ans) in zip(queries[::2], queries[1::2]):
        assert not q_ans and v_ans and q.startswith("\n?") and q.endswith(":")
        assert pairs[q[2:-1]] == v  # the answer is the value stated in the context
        asked.append(q[2:-1])
    assert sorted(asked[:10]) == sorted(pairs)  # without replacement while keys last
    # the first query reads like a kv_retrieval eval prompt
    assert "".join(t for t, _ in segs[:2]) == f"{context}\n?{asked[0]}:"


def test_context_length_range():
    lens = {len(kv_multi_query(random.Random(i), context_len=140, min_context_len=35, n_queries=1)[0][0].split(" "))
            for i in range(40)}
    assert min(lens) >= 5 and max(lens) <= 20 and len(lens) > 5


def test_mask_marks_exactly_the_answer_bytes():
    tok = ByteTokenizer()
    ids, mask = encode_document(tok, [("ab:", False), ("12", True), ("\n?ab:", False), ("12", True), ("\n", False)])
    assert ids == [tok.bos_id, *b"ab:12\n?ab:12\n", tok.eos_id]
    assert [i for i, m in enumerate(mask) if m] == [4, 5, 11, 12]


def test_packing_matches_packed_lm_batch_for_a_registered_task():
    tok = ByteTokenizer()
    kw = {"context_len": 30, "key_len": 2, "value_len": 3}
    ids, mask, pad = packed_lm_batch_with_mask(tok, "kv_retrieval", kw, 2, 100, 5, 7)
    assert not pad.any()  # packed rows are full
    assert torch.equal(ids, packed_lm_batch(tok, "kv_retrieval", kw, 2, 100, 5, 7))
    # every masked run is 3 digits right after "?xx:"
    for row, m in zip(ids.tolist(), mask.tolist()):
        for i, on in enumerate(m):
            if on:
                assert chr(row[i]).isdigit()
                starts = i - 1 >= 0 and not m[i - 1]
                if starts:
                    assert bytes(row[i - 4:i]).decode()[0] == "?" and row[i - 1] == ord(":")
    assert mask.sum() > 0


def test_lm_batch_default_is_the_unweighted_packing_and_weights_follow_the_mask():
    tok = ByteTokenizer()
    ids, w = lm_batch(tok, "arithmetic", {}, 1.0, 2, 50, 0, 3)
    assert w is None and torch.equal(ids, packed_lm_batch(tok, "arithmetic", {}, 2, 50, 0, 3))
    ids, w = lm_batch(tok, "kv_multi_query", {"context_len": 40, "n_queries": 4}, 0.25, 2, 80, 0, 3)
    _, mask, _ = packed_lm_batch_with_mask(tok, "kv_multi_query", {"context_len": 40, "n_queries": 4}, 2, 80, 0, 3)
    assert w.shape == (2, 80) and torch.equal(w, torch.where(mask[:, 1:], 1.0, 0.25))
    assert TaskSpec().non_answer_weight == 1.0  # default: plain LM loss, as before


def test_weighted_lm_loss_is_the_weighted_mean_of_token_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    w = loss_weights(torch.rand(2, 5, generator=g) > 0.5, 0.1)
    by_hand = 0.0
    for b in range(2):
        for t in range(5):
            by_hand += w[b, t] * -torch.log_softmax(logits[b, t], -1)[targets[b, t]]
    assert weighted_lm_loss(logits, targets, w).item() == pytest.approx((by_hand / w.sum()).item(), rel=1e-5)
    assert weighted_lm_loss(logits, targets, None).item() == pytest.approx(F.cross_entropy(
        logits.flatten(0, 1), targets.flatten()).item())
    assert weighted_lm_loss(logits, targets, torch.ones(2, 5)).item() == pytest.approx(lm_loss(logits, targets).item())


def test_unpacked_rows_hold_one_document_from_position_zero_and_padding_weighs_nothing():
    tok = ByteTokenizer()
    kw = {"context_len": 60, "n_needles": 3, "value_len": 2}
    ids, mask, pad = packed_lm_batch_with_mask(tok, "passkey_multi_query", kw, 4, 200, 1, 2, pack=False)
    rng = random.Random("1/pretrain/2")  # the generator's own seeding: row b is the b-th document drawn
    from dsarl.data.retrieval_docs import document_segments
    for b in range(4):
        doc, doc_mask = encode_document(tok, document_segments("passkey_multi_query", rng, kw))
        n = len(doc)
        assert ids[b, :n].tolist() == doc and mask[b, :n].tolist() == doc_mask
        assert not pad[b, :n].any() and pad[b, n:].all() and (ids[b, n:] == tok.pad_id).all()
    ids2, w = lm_batch(tok, "passkey_multi_query", kw, 0.5, 4, 200, 1, 2, pack=False)
    assert torch.equal(ids2, ids) and torch.equal(w, loss_weights(mask[:, 1:], 0.5, pad[:, 1:]))
    assert (w[pad[:, 1:]] == 0).all() and (w[mask[:, 1:]] == 1).all()
    # a document longer than the row is cut, not padded
    ids, _, pad = packed_lm_batch_with_mask(tok, "passkey_multi_query", kw, 2, 30, 1, 2, pack=False)
    assert not pad.any() and (ids[:, 0] == tok.bos_id).all()


@pytest.mark.parametrize("eos_prob", [0.0, 0.3, 1.0])
def test_eos_prob_packing_matches_packed_lm_batch_and_keeps_the_answer_mask(eos_prob):
    tok = ByteTokenizer()
    seed = fresh_seed()
    ids, mask, _ = packed_lm_batch_with_mask(tok, "arithmetic", {}, 3, 120, seed, 2, eos_prob=eos_prob)
    assert torch.equal(ids, packed_lm_batch(tok, "arithmetic", {}, 3, 120, seed, 2, eos_prob=eos_prob)), seed
    # the answer mask still marks exactly the digits after "=" (an eos dropped or not)
    for row, m in zip(ids.tolist(), mask.tolist()):
        for i, on in enumerate(m):
            if on:
                assert chr(row[i]).isdigit() or chr(row[i]) == "-", seed
                j = i
                while m[j - 1]:
                    j -= 1
                assert row[j - 1] == ord("="), seed


def test_eos_prob_of_multi_query_documents():
    tok = ByteTokenizer()
    kw = {"context_len": 40, "n_needles": 3, "value_len": 1}
    ids, _, _ = packed_lm_batch_with_mask(tok, "passkey_multi_query", kw, 16, 400, 0, 0, eos_prob=0.3)
    share = int((ids == tok.eos_id).sum()) / int((ids == tok.bos_id).sum())
    assert 0.15 < share < 0.45  # ~100 documents


def test_passkey_multi_query_min_queries_asks_a_random_number_of_distinct_needles():
    rng = random.Random(fresh_seed())
    counts = set()
    for _ in range(200):
        segs = passkey_multi_query(rng, context_len=60, n_needles=4, value_len=1, min_queries=2)
        queries = [t for t, _ in segs if t.startswith("\n?")]
        assert len({q for q in queries}) == len(queries)
        counts.add(len(queries))
    assert counts == {2, 3, 4}
    segs = passkey_multi_query(rng, context_len=60, n_needles=4, value_len=1)
    assert sum(t.startswith("\n?") for t, _ in segs) == 4  # default: every needle
