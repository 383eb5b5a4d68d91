"""Datasets on disk or by name, as rows (one dict of every column per example), and the packed LM batches
used for pretraining on the synthetic tasks.

`load_rows(source, split, limit, subset)` reads, by what `source` is:
- a file: Parquet (pyarrow), JSONL, a JSON array of objects (or JSON lines under a .json name), CSV (the csv
  module: every value a string, exactly as written, so an answer "007" stays "007");
- a directory written by `datasets`' save_to_disk (a Dataset, or a DatasetDict whose `split` is taken);
- a directory of such files, read in sorted path order. Files named by split as the Hugging Face hub lays
  them out (`train.jsonl`, `test-00000-of-00001.parquet`, `data/validation/...`) give the `split` only; a
  directory with no split in its names is all one split, whatever `split` says;
- anything else: a `datasets.load_dataset` name (a hub id where a hub is reachable, with `subset` as its
  config name). A missing source that reads as a path (`data/train.jsonl`, `/abs/dir`, `./set`, `a/b/c`) is
  a FileNotFoundError, never a hub query.
Only the first `limit` rows are kept (None: all), in file order.
"""
import csv
import io
import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .tasks import get_task

FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")


def read_text(path: Path) -> str:
    """A text data file's contents; bytes that are not UTF-8 raise ValueError naming the file, the line and,
    where lines are rows (JSON lines), the row: found later, the bare UnicodeDecodeError named neither."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start)  # 0-based
        where = f"line {line + 1}"
        if path.suffix == ".jsonl" or (path.suffix == ".json" and not data.lstrip().startswith(b"[")):
            row = sum(1 for ln in data[: data.rfind(b"\n", 0, e.start) + 1].split(b"\n") if ln.strip())
            where = f"row {row} ({where})"
        elif path.suffix == ".csv":
            where = f"{where} (the header is line 1)"
        raise ValueError(f"{path}: {where}: not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} "
                         f"({e.reason})") from None


def read_file(path: Path) -> list[dict]:
    """Every row of one data file."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    if path.suffix in (".jsonl", ".json"):
        text = read_text(path)
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: neither JSON lines nor a JSON array of rows ({e})") from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f"{path}: row {bad} is not a JSON object: {rows[bad]!r:.200}")
        return rows
    raise ValueError(f"{path}: expected a {', '.join(FILE_SUFFIXES)} file")


def file_split(relative: Path) -> str | None:
    """The split a file's path inside a dataset directory names (hub layout), or None."""
    for part in [*relative.parent.parts, relative.name]:
        m = re.match(rf"^({'|'.join(SPLIT_NAMES)})(?=$|[-_.])", part)
        if m:
            return m.group(1)
    return None


def directory_files(directory: Path, split: str | None) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if not files:
        raise FileNotFoundError(f"{directory}: no {', '.join(FILE_SUFFIXES)} files in it")
    splits = {f: file_split(f.relative_to(directory)) for f in files}
    if split is None or all(s is None for s in splits.values()):
        return files
    chosen = [f for f, s in splits.items() if s == split]
    if not chosen:
        raise ValueError(f"{directory}: no files of split {split!r} (splits there: "
                         f"{sorted({s for s in splits.values() if s})})")
    return chosen


def is_saved_dataset(directory: Path) -> bool:
    """A directory `datasets`' save_to_disk wrote (a Dataset or a DatasetDict)."""
    return (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()


def looks_like_path(source: str) -> bool:
    """A source meant as a local path (a data-file suffix, absolute, ./ ../ ~, or more than one /), which must
    not be tried as a hub name: a mistyped path would wait on the hub's retries, then fail as a name."""
    return (Path(source).suffix in FILE_SUFFIXES or source.startswith(("/", "./", "../", "~"))
            or source.count("/") > 1)


def load_hf_rows(source: str, split: str | None, limit: int | None, subset: str | None) -> list[dict]:
    import datasets

    path = Path(source)
    if path.is_dir() and is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{source}: no split {split!r} (splits: {sorted(ds)})")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source, subset, split=split or "train")
        except Exception as e:
            raise ValueError(f"data source {source!r} is neither a file nor a directory here, and "
                             f"datasets.load_dataset could not load it: {type(e).__name__}: {e}") from e
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()


def local_or_name(source: str, resolve) -> str:
    """A config's data source: the resolved (config-relative) path where one exists, else as written (a missing
    file, or a datasets name)."""
    local = resolve(source)
    return local if local is not None and Path(local).exists() else source


def load_rows(source: str | Path, split: str | None = "train", limit: int | None = None,
              subset: str | None = None) -> list[dict]:
    """Rows of a data file, a directory of them, a saved dataset or a `datasets` name (see the module docstring)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    path = Path(source)
    if path.is_file():
        rows = read_file(path)
    elif looks_like_path(str(source)) and not path.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    elif path.is_dir() and not is_saved_dataset(path):
        rows = []
        for f in directory_files(path, split):
            rows += read_file(f)
            if limit is not None and len(rows) >= limit:
                break
    else:
        return load_hf_rows(str(source), split, limit, subset)
    return rows if limit is None else rows[:limit]


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
