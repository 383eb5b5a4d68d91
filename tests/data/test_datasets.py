"""Packed pretraining batches: documents, eos placement, determinism by (seed, step)."""
import torch

from dsarl.data.datasets import lm_document, packed_lm_batch
from dsarl.models import ByteTokenizer

TOK = ByteTokenizer()


def test_batches_are_documents_packed_end_to_end_and_depend_only_on_seed_and_step():
    a = packed_lm_batch(TOK, "arithmetic", {}, 3, 64, seed=1, step=5)
    assert a.shape == (3, 65)
    assert torch.equal(a, packed_lm_batch(TOK, "arithmetic", {}, 3, 64, seed=1, step=5))
    assert not torch.equal(a, packed_lm_batch(TOK, "arithmetic", {}, 3, 64, seed=1, step=6))
    row = a[0].tolist()
    assert row[0] == TOK.bos_id
    first_doc = row[1: row.index(TOK.eos_id)]
    text = TOK.decode(first_doc)
    assert text.endswith("\n") and "=" in text
    assert lm_document({"prompt": text.split("=")[0] + "=", "answer": text.split("=")[1][:-1]}) == text


def test_eos_prob_sets_the_share_of_documents_that_stop():
    def share(p):
        ids = packed_lm_batch(TOK, "arithmetic", {}, 16, 256, seed=0, step=0, eos_prob=p)
        return int((ids == TOK.eos_id).sum()) / int((ids == TOK.bos_id).sum())

    assert share(1.0) >= 0.95  # every document but possibly the cut last one
    assert share(0.0) == 0.0
    assert 0.2 < share(0.3) < 0.4  # ~500 documents: a binomial share far from both ends
