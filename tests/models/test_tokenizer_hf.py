"""Real Hugging Face tokenizer directories against transformers' AutoTokenizer on the same directory.

A small byte-level BPE is trained with the `tokenizers` library and saved by transformers itself (v5 layout:
chat_template.jinja beside tokenizer_config.json), and by hand in the older layout (the template inside
tokenizer_config.json, special tokens as AddedToken dicts, a null bos as many released tokenizers have).
dsarl's ids for text, special tokens and rendered chats must be AutoTokenizer's.
"""
import json

import pytest

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from dsarl.models import apply_chat_template, load_tokenizer  # noqa: E402

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["What is 12 + 7? Answer with a number.", "Grüße aus Köln, 你好", "  leading spaces\tand\ttabs\n", ""]
CHATS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another, ü?"}],
]
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def bpe(texts=TEXTS * 5 + [m["content"] for c in CHATS for m in c] * 5) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.fixture(scope="module")
def v5_dir(tmp_path_factory):
    """Saved by transformers: chat_template.jinja, bos/eos/pad as strings in tokenizer_config.json."""
    d = tmp_path_factory.mktemp("v5")
    t = PreTrainedTokenizerFast(tokenizer_object=bpe(), bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    t.chat_template = CHATML
    t.save_pretrained(d)
    assert (d / "chat_template.jinja").is_file()
    return d


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory):
    """Older layout: the template inside tokenizer_config.json, AddedToken dicts, bos null, no pad."""
    d = tmp_path_factory.mktemp("v4")
    bpe().save(str(d / "tokenizer.json"))
    eos = {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
           "special": True, "__type": "AddedToken"}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": eos, "chat_template": CHATML}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1], "stop_strings": ["\n\n"]}))
    return d


def reference_chat(auto, messages, add_generation_prompt):
    return list(auto.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         return_dict=False))


@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_ids_special_tokens_and_chats_equal_autotokenizer(layout, v5_dir, v4_dir):
    d = v5_dir if layout == "v5" else v4_dir
    auto, ours = AutoTokenizer.from_pretrained(d), load_tokenizer(d)
    assert ours.kind == "hf" and ours.chat_template == CHATML
    assert ours.bos_id == auto.bos_token_id and ours.eos_id == auto.eos_token_id
    assert ours.pad_id == (auto.pad_token_id if auto.pad_token_id is not None else auto.eos_token_id)
    for text in TEXTS:
        assert ours.encode(text) == auto.encode(text, add_special_tokens=False), text
        expected_bos = [] if auto.bos_token_id is None else [auto.bos_token_id]
        assert ours.encode(text, add_bos=True) == expected_bos + auto.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == text
    for chat in CHATS:
        for gen in (True, False):
            assert apply_chat_template(ours, chat, add_generation_prompt=gen) == reference_chat(auto, chat, gen)


def test_null_bos_and_stop_ids_from_generation_config(v4_dir):
    ours = load_tokenizer(v4_dir)
    im_end = ours.token_id("<|im_end|>")
    assert ours.bos_id is None and ours.eos_id == im_end and ours.pad_id == im_end
    assert ours.stop_ids == (im_end, 3, 1) and ours.stop_strings == ("\n\n",)
    assert ours.special_tokens_map() == {"eos_token": "<|im_end|>"}  # as AutoTokenizer passes them to a template
    assert AutoTokenizer.from_pretrained(v4_dir).special_tokens_map == {"eos_token": "<|im_end|>"}


def test_saved_tokenizer_reloads_in_transformers_and_dsarl_with_the_template(v4_dir, tmp_path):
    ours = load_tokenizer(v4_dir)
    ours.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHATML and cfg["bos_token"] is None  # the original config's keys are kept
    auto, again = AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    for chat in CHATS:
        assert apply_chat_template(again, chat) == reference_chat(auto, chat, True) == apply_chat_template(ours, chat)
    assert again.stop_ids == ours.stop_ids and again.stop_strings == ours.stop_strings
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [3, 1]


def test_named_templates_pick_default(tmp_path):
    bpe().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHATML}]}))
    assert load_tokenizer(tmp_path).chat_template == CHATML


def test_chat_without_a_template_or_markers_is_refused_by_name(tmp_path):
    bpe().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hi", add_bos=True)[0] == tok.token_id("<s>")
    with pytest.raises(ValueError, match="no chat_template"):
        apply_chat_template(tok, CHATS[0])


@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_grpo_prompt_ids_of_text_and_message_rows(layout, v5_dir, v4_dir):
    from dsarl.launch.grpo_loop import prompt_ids_for

    d = v5_dir if layout == "v5" else v4_dir
    auto, ours = AutoTokenizer.from_pretrained(d), load_tokenizer(d)
    text, chat = "What is 3 + 4?", CHATS[1]
    bos = [] if auto.bos_token_id is None else [auto.bos_token_id]
    assert prompt_ids_for([{"prompt": text}], ours, "raw") == [bos + auto.encode(text, add_special_tokens=False)]
    assert prompt_ids_for([{"prompt": text}], ours, "chat") == [
        reference_chat(auto, [{"role": "user", "content": text}], True)]
    for fmt in ("raw", "chat"):  # a message list is a chat whatever the format says
        assert prompt_ids_for([{"prompt": chat}], ours, fmt) == [reference_chat(auto, chat, True)]


def test_byte_tokenizer_checkpoints_carry_dsarl_chat_format_for_transformers(tmp_path):
    from dsarl.models import ByteTokenizer

    ByteTokenizer().save(tmp_path)
    auto, ours = AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    assert ours.kind == "byte" and ours.chat_template is None  # dsarl still builds its chats from ids
    for chat in CHATS:
        for gen in (True, False):
            assert apply_chat_template(ours, chat, add_generation_prompt=gen) == reference_chat(auto, chat, gen)
