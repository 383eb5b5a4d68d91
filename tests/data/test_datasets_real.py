"""Real dataset files, directories and saved datasets: exact row counts and values against plain reading.

References are written and read without pyarrow or pandas where the format allows it (json, csv); the
Parquet file is written by pyarrow from the same Python rows, so its reference is those rows.
"""
import csv
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsarl.data.datasets import load_rows
from dsarl.data.prompts import prompt_rows
from dsarl.launch.grpo_loop import PromptData, load_prompt_rows

ROWS = [{"question": f"What is {i} + {i}?", "solution": str(2 * i), "level": i % 3, "tags": ["add", str(i)]}
        for i in range(7)]
CHATS = [{"messages": [{"role": "system", "content": "Answer with a number."},
                       {"role": "user", "content": f"{i} * 3 = ?"},
                       {"role": "assistant", "content": str(3 * i)}], "id": f"c{i}"} for i in range(5)]


def write_jsonl(rows, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plain_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plain_csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_jsonl_json_array_parquet_and_csv_give_every_row_and_column(tmp_path):
    jl = write_jsonl(ROWS, tmp_path / "a.jsonl")
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps(ROWS, indent=1))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "solution"])
        w.writerows([[r["question"], "00" + r["solution"]] for r in ROWS])  # "007" must stay a string
    assert load_rows(jl) == plain_jsonl(jl) == ROWS
    assert load_rows(arr) == json.loads(arr.read_text()) == ROWS
    assert load_rows(tmp_path / "c.parquet") == ROWS
    got = load_rows(tmp_path / "d.csv")
    assert got == plain_csv(tmp_path / "d.csv") and len(got) == 7 and got[3]["solution"] == "006"
    assert load_rows(jl, limit=3) == ROWS[:3] and load_rows(jl, limit=0) == []
    (tmp_path / "e.json").write_text(json.dumps({"data": ROWS}, indent=1))
    with pytest.raises(ValueError, match="neither JSON lines nor a JSON array"):
        load_rows(tmp_path / "e.json")


def test_a_directory_is_read_in_path_order_and_split_by_hub_file_names(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    write_jsonl(ROWS[:3], flat / "part-0.jsonl")
    write_jsonl(ROWS[3:], flat / "part-1.jsonl")
    assert load_rows(flat) == ROWS and load_rows(flat, split="anything") == ROWS
    assert load_rows(flat, limit=4) == ROWS[:4]

    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), hub / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[2:5]), hub / "data" / "train-00001-of-00002.parquet")
    write_jsonl(ROWS[5:], hub / "data" / "test.jsonl")
    (hub / "README.md").write_text("not data")
    assert load_rows(hub, split="train") == ROWS[:5]
    assert load_rows(hub, split="test") == ROWS[5:]
    with pytest.raises(ValueError, match="no files of split 'validation'"):
        load_rows(hub, split="validation")


def test_saved_dataset_directories_and_their_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                          "test": datasets.Dataset.from_list(ROWS[4:])}).save_to_disk(str(tmp_path / "dict"))
    assert load_rows(tmp_path / "one") == ROWS
    assert load_rows(tmp_path / "dict", split="test") == ROWS[4:]
    assert load_rows(tmp_path / "dict", split="train", limit=2) == ROWS[:2]
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_rows(tmp_path / "dict", split="dev")


def test_a_missing_path_is_no_file_and_an_unknown_name_is_not_loadable(tmp_path):
    pytest.importorskip("datasets")
    for missing in (tmp_path / "gone.jsonl", tmp_path / "gone-dir", "data/train.jsonl", "./set", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such file or directory"):
            load_rows(missing)  # a path is never tried as a hub name
    # a name goes to datasets.load_dataset; offline (set before huggingface_hub is imported, so in a fresh process)
    # it fails at once instead of retrying a hub that cannot be reached here
    code = ("from dsarl.data.datasets import load_rows\n"
            "try:\n    load_rows('no-such-org/no-such-set')\nexcept ValueError as e:\n    print(e)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "neither a file nor a directory here" in out and "no-such-org/no-such-set" in out


def test_prompt_and_answer_keys_and_chats(tmp_path):
    rows = prompt_rows(ROWS, prompt_key="question", answer_key="solution")
    assert [r["prompt"] for r in rows] == [r["question"] for r in ROWS]
    assert [r["answer"] for r in rows] == [r["solution"] for r in ROWS]
    assert all(r["level"] == o["level"] and r["tags"] == o["tags"] for r, o in zip(rows, ROWS))  # columns kept

    chats = prompt_rows(CHATS, prompt_key="messages")
    assert [r["prompt"] for r in chats] == [c["messages"][:2] for c in CHATS]  # the reply is the reference
    assert [r["answer"] for r in chats] == [str(3 * i) for i in range(5)]
    assert chats[2]["messages"] == CHATS[2]["messages"] and chats[2]["id"] == "c2"

    with pytest.raises(ValueError, match="row 0: no 'prompt' column"):
        prompt_rows(ROWS)
    with pytest.raises(ValueError, match="no 'gold' column"):
        prompt_rows(ROWS, prompt_key="question", answer_key="gold")
    with pytest.raises(ValueError, match=r"row 0\['messages'\]\[0\]"):
        prompt_rows([{"messages": [{"text": "x"}]}], prompt_key="messages")


def test_load_prompt_rows_reads_train_and_test_splits_with_keys(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    write_jsonl(CHATS[:4], d / "train.jsonl")
    write_jsonl(CHATS[4:], d / "test.jsonl")
    data = PromptData(path="set", prompt_key="messages", test_split="test", limit=3)
    train, test = load_prompt_rows(data, seed=0, resolve=lambda p: str(tmp_path / p))
    assert [r["id"] for r in train] == ["c0", "c1", "c2"] and [r["id"] for r in test] == ["c4"]
    assert test[0]["prompt"] == CHATS[4]["messages"][:2] and test[0]["answer"] == "12"
