"""Retrieval scoring: teacher-forced argmax = greedy decoding, padding and batching do not change a
row's score, random selections are valid, and the table."""
import torch

from dsarl.learner.retrieval_eval import (RetrievalResult, accuracy_table, encode_rows, random_indices,
                                          retrieval_accuracy, score_batch)
from dsarl.models import ByteTokenizer, DSAConfig, build_model


class NextTokenOracle(torch.nn.Module):
    """Predicts the next input token (teacher forcing shows it), except at positions in `wrong`."""

    def __init__(self, wrong: dict[int, set[int]]):
        super().__init__()
        self.wrong = wrong
        self.config = DSAConfig(num_hidden_layers=1, index_topk=4)
        self.w = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.w.device

    def forward(self, ids, attention=None, indices=None, logits_slice=None):
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # [B, T]
        for row, positions in self.wrong.items():
            for t in positions:
                nxt[row, t] = (nxt[row, t] + 1) % 256
        logits = torch.nn.functional.one_hot(nxt, 264).float()[:, logits_slice]
        return type("Out", (), {"logits": logits})


def test_exact_match_needs_every_answer_token_and_padding_is_harmless():
    tok = ByteTokenizer()
    rows = [{"prompt": "ab:12 cd:34\n?cd:", "answer": "34"}, {"prompt": "x:9\n?x:", "answer": "9"},
            {"prompt": "long prompt here ?q:", "answer": "777"}]
    seqs, starts = encode_rows(tok, rows)
    assert tok.decode(seqs[0][starts[0]:]) == "34"
    # row 2: its last answer token (position len-2 predicts len-1) is wrong
    oracle = NextTokenOracle({2: {len(seqs[2]) - 2}})
    exact, correct, total = score_batch(oracle, seqs, starts, "dense", tok.pad_id)
    assert exact == [True, True, False] and correct == [2, 1, 2] and total == [2, 1, 3]
    # a wrong token before the answer does not matter
    oracle = NextTokenOracle({0: {starts[0] - 3}})
    assert score_batch(oracle, seqs, starts, "dense", tok.pad_id)[0] == [True, True, True]


def greedy_answer(model, prompt_ids, n, attention):
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]), attention=attention).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_teacher_forced_scoring_matches_greedy_decoding_on_a_real_model():
    cfg = DSAConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=8)
    model = build_model(cfg, seed=0).eval()
    tok = ByteTokenizer()
    # rows whose "answers" are the model's own greedy continuation (exact) or not: both outcomes occur
    rows = []
    for i, prompt in enumerate(["abc:1 de:2\n?de:", "k:55 m:66\n?k:", "zz:0\n?zz:"]):
        p_ids = [tok.bos_id, *tok.encode(prompt)]
        greedy = greedy_answer(model, p_ids, 3, "sparse")
        answer = greedy if i != 1 else greedy[:2] + [(greedy[2] + 1) % 256]
        rows.append((p_ids + answer, len(p_ids), answer == greedy))
    seqs, starts, want = zip(*rows)
    exact, _, _ = score_batch(model, list(seqs), list(starts), "sparse", tok.pad_id)
    assert exact == list(want) == [True, False, True]


def test_random_indices_are_distinct_visible_keys():
    positions = torch.arange(20)[None].expand(2, 20)
    for idx in random_indices(positions, 6, n_layers=2, seed=3):
        for b in range(2):
            for t in range(20):
                sel = idx[b, t][idx[b, t] >= 0].tolist()
                assert len(sel) == min(6, t + 1) and len(set(sel)) == len(sel) and max(sel) <= t


def test_retrieval_accuracy_runs_all_modes_and_the_table_lists_them():
    cfg = DSAConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, q_lora_rank=32,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                    index_head_dim=16, index_topk=8)
    model = build_model(cfg, seed=0).eval()
    results = [retrieval_accuracy(model, ByteTokenizer(), 48, 3, mode, batch_size=2) for mode in
               ("dense", "sparse", "random")]
    assert [r.n for r in results] == [3, 3, 3] and all(0 <= r.accuracy <= 1 for r in results)
    table = accuracy_table(results + [RetrievalResult("m", "dense", 96, None, 3, 1.0, 1.0)])
    assert "acc@48" in table and "acc@96" in table and "| model | random | 8 |" in table
