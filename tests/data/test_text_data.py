"""Text and chat datasets as pretraining documents and SFT pairs, against AutoTokenizer on the same directory,
and a short `dsarl pretrain` on a messages JSONL with a checkpoint whose tokenizer is a real BPE."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from dsarl.data.text_data import document_ids, load_documents, packed_document_batch, sft_pairs  # noqa: E402
from dsarl.models import load_tokenizer  # noqa: E402

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                       {"role": "assistant", "content": str(i + 1)}]} for i in range(6)]
TEXTS = [{"text": f"Document {i}: the sum of {i} and 1 is {i + 1}.", "question": f"{i} + 1 =", "answer": i + 1}
         for i in range(6)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["text"] for r in TEXTS] + [m["content"] for c in CHATS for m in c["messages"]]
    tok.train_from_iterator(corpus * 3, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    hf.chat_template = CHATML
    hf.save_pretrained(d, save_jinja_files=False)
    return d


def chat_ids(auto, messages, gen):
    return list(auto.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False))


def test_documents_are_the_text_with_bos_and_eos_or_the_rendered_chat(tok_dir):
    auto, tok = AutoTokenizer.from_pretrained(tok_dir), load_tokenizer(tok_dir)
    for r in TEXTS:
        expected = [auto.bos_token_id, *auto.encode(r["text"], add_special_tokens=False), auto.eos_token_id]
        assert document_ids(tok, r["text"]) == expected
    for c in CHATS:
        assert document_ids(tok, c["messages"]) == chat_ids(auto, c["messages"], False)
    with pytest.raises(ValueError, match="row 0 has no 'text' column"):
        load_documents(tok, CHATS, "text")


def test_packed_batches_are_whole_documents_end_to_end_and_fixed_by_seed_and_step(tok_dir):
    tok = load_tokenizer(tok_dir)
    docs = load_documents(tok, CHATS + [{"messages": r["text"]} for r in TEXTS], "messages")
    a = packed_document_batch(docs, 3, 40, seed=1, step=2)
    assert a.shape == (3, 41)
    assert torch.equal(a, packed_document_batch(docs, 3, 40, seed=1, step=2))
    assert not torch.equal(a, packed_document_batch(docs, 3, 40, seed=1, step=3))
    for row in a.tolist():  # every row parses as documents, the last one cut
        i = 0
        while i < len(row):
            match = [d for d in docs if row[i:i + len(d)] == d[: len(row) - i]]
            assert match, (i, row)
            i += len(match[0])


def test_sft_pairs_split_a_chat_at_its_last_reply_and_a_text_row_at_its_answer(tok_dir):
    auto, tok = AutoTokenizer.from_pretrained(tok_dir), load_tokenizer(tok_dir)
    prompts, replies = sft_pairs(tok, CHATS, "messages")
    for c, p, r in zip(CHATS, prompts, replies):
        assert p == chat_ids(auto, c["messages"][:-1], True)
        assert p + r == chat_ids(auto, c["messages"], False)
        assert tok.decode(r) == c["messages"][-1]["content"] + "\n"  # the reply, its <|im_end|> and newline
    prompts, replies = sft_pairs(tok, TEXTS, "question", answer_key="answer")
    assert prompts[2] == [auto.bos_token_id, *auto.encode("2 + 1 =", add_special_tokens=False)]
    assert replies[2] == [*auto.encode("3", add_special_tokens=False), auto.eos_token_id]
    with pytest.raises(ValueError, match="does not end with an assistant message"):
        sft_pairs(tok, [{"messages": CHATS[0]["messages"][:1]}], "messages")


def test_pretrain_on_a_messages_jsonl_with_a_bpe_checkpoint(tok_dir, tmp_path):
    from dsarl.launch.config import load_config
    from dsarl.learner.pretrain import PretrainConfig, pretrain
    from dsarl.models import DSAConfig, build_model, from_pretrained, save_pretrained

    tok = load_tokenizer(tok_dir)
    cfg = DSAConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                    num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                    v_head_dim=8, index_n_heads=2, index_head_dim=16, index_topk=8, bos_token_id=tok.bos_id,
                    eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_pretrained(build_model(cfg, seed=0), tmp_path / "init", tok)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    run = tmp_path / "run"
    final = pretrain(load_config(PretrainConfig, None, [
        f"model.init_from={tmp_path / 'init'}", f"task.path={data}", "task.text_key=messages", f"run_dir={run}",
        "steps=3", "batch_size=2", "seq_len=32", "log_every=1", "save_every=3", "tensorboard=false"]),
        show_progress=False)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    _, saved_tok = from_pretrained(final)
    assert saved_tok.chat_template == CHATML and saved_tok.eos_id == tok.eos_id
