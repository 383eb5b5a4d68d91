"""Prompt datasets on disk (Parquet or JSONL) and the packed LM batches used for pretraining."""
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .tasks import get_task


def load_rows(path: str | Path) -> list[dict]:
    """Rows of a Parquet or JSONL file; each must have a `prompt` column (all columns are kept)."""
    path = Path(path)
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"{path}: expected a .parquet or .jsonl prompt file")
    for i, row in enumerate(rows):
        if "prompt" not in row:
            raise ValueError(f"{path}: row {i} has no 'prompt' column (columns: {sorted(row)})")
    return rows


def save_rows(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lm_document(row: dict) -> str:
    """The text a pretraining example contributes: prompt, answer, newline."""
    return f"{row['prompt']}{row['answer']}\n"


def packed_lm_batch(tokenizer, task: str, task_kwargs: dict, batch_size: int, seq_len: int, seed: int,
                    step: int, eos_prob: float = 1.0) -> torch.Tensor:
    """[batch_size, seq_len + 1] token ids: documents (bos + text + eos) packed end to end.

    `eos_prob` < 1 ends only that share of documents with eos (the next one follows directly), like a
    web corpus where an answer is usually followed by more text: a model trained on it often goes on
    after its answer instead of stopping. The batch depends only on (seed, step), so a resumed run
    sees exactly the data it would have.
    """
    rng = random.Random(f"{seed}/pretrain/{step}")
    gen = get_task(task)
    out = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
    for b in range(batch_size):
        ids: list[int] = []
        while len(ids) < seq_len + 1:
            ids += [tokenizer.bos_id, *tokenizer.encode(lm_document(gen(rng, **task_kwargs)))]
            if eos_prob >= 1.0 or rng.random() < eos_prob:
                ids.append(tokenizer.eos_id)
        out[b] = torch.tensor(ids[: seq_len + 1])
    return out
