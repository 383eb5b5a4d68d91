"""Bring your own model: GRPO on a DeepSeek-V3.2-architecture MoE with a real tokenizer and a chat dataset.

    python examples/moe_dsa_grpo.py                        # a tiny random model, made here: under a minute on a CPU
    python examples/moe_dsa_grpo.py --model /path/to/ckpt  # your Hugging Face checkpoint and its tokenizer
    python examples/moe_dsa_grpo.py steps=20 rollout.max_new_tokens=32   # any config key

What it does, each step a thing a user does with their own model and data:
1. writes a chat dataset: JSONL rows of `messages` (system, user, and the reference assistant reply);
2. without --model: trains a byte-level BPE tokenizer on that text with the `tokenizers` library and saves it
   as transformers does (tokenizer.json, bos/eos/pad and a ChatML chat template in tokenizer_config.json),
   then makes a tiny random DeepseekV32ForCausalLM (MLA + lightning indexer, shared + routed experts) with
   transformers and saves it beside the tokenizer;
3. runs `dsarl grpo` with configs/examples/moe_dsa_grpo.yaml on it (Ray on this machine), prompts built by
   the tokenizer's chat template, rewarded against the reply;
4. loads the result with transformers (AutoModelForCausalLM + AutoTokenizer) and generates an answer.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "examples" / "moe_dsa_grpo.yaml"
SYSTEM = "Answer with the number only."
# ChatML, as many released chat models use; eos is <|im_end|>, so a reply ends where its turn does
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def chat_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"id": f"{seed}-{i}", "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": str(a + b)}]})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE (every byte representable) trained on `texts`, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_moe_checkpoint(directory: Path, tokenizer, seed: int = 0) -> Path:
    """A random DeepSeek-V3.2-architecture MoE made and saved by transformers, its tokenizer beside it."""
    import torch
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    cfg = DeepseekV32Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2,
        routed_scaling_factor=1.0, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, index_n_heads=4, index_head_dim=16, index_topk=16, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    DeepseekV32ForCausalLM(cfg).save_pretrained(directory)
    tokenizer.save_pretrained(directory, save_jinja_files=False)  # the template inside tokenizer_config.json
    return directory


def prepare(out: Path, model: str | None, seed: int = 0) -> tuple[Path, Path, Path]:
    """-> (checkpoint, train JSONL, test JSONL)."""
    train = write_jsonl(chat_rows(64, seed), out / "chat_train.jsonl")
    test = write_jsonl(chat_rows(16, seed + 1), out / "chat_test.jsonl")
    if model is not None:
        return Path(model), train, test
    texts = [m["content"] for r in chat_rows(64, seed) for m in r["messages"]] + ["system user assistant"]
    return tiny_moe_checkpoint(out / "init", train_bpe_tokenizer(texts), seed), train, test


def generate_with_transformers(checkpoint: Path, messages: list[dict], max_new_tokens: int = 16) -> str:
    """The trained checkpoint as transformers sees it: AutoTokenizer's chat template, AutoModel's greedy reply."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Hugging Face checkpoint directory (default: make a tiny random MoE)")
    p.add_argument("--out", default="runs/moe-dsa-example", help="where the data, model and run go")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)

    from dsarl.launch.config import load_config
    from dsarl.launch.grpo_loop import GRPOConfig, run_grpo
    from dsarl.launch.stage_pretrain import config_resolver, write_resolved_config

    t0 = time.perf_counter()
    out = Path(args.out)
    init, train, test = prepare(out, args.model)
    cfg = load_config(GRPOConfig, args.config, [f"init_from={init}", f"data.path={train}", f"data.test_path={test}",
                                                f"run_dir={out / 'grpo'}", *args.overrides])
    write_resolved_config(cfg, cfg.run_dir)
    t1 = time.perf_counter()
    final = run_grpo(cfg, resolve=config_resolver(cfg.config_path))
    t2 = time.perf_counter()
    question = chat_rows(1, 123)[0]["messages"][:2]
    reply = generate_with_transformers(final, question)
    t3 = time.perf_counter()
    print(f"final checkpoint: {final}\nQ: {question[-1]['content']}\nA (transformers): {reply!r}")
    result = {"final": str(final), "reply": reply, "time_s": {"prepare": t1 - t0, "grpo": t2 - t1,
                                                               "generate": t3 - t2, "total": t3 - t0}}
    print(json.dumps(result["time_s"]))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
