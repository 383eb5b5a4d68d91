"""The rollout Arrow schema (DESIGN.md section 4): one row per completion, written as Parquet.

Columns: prompt id, group id (the GRPO group: one prompt's n samples in one step), prompt index and
sample index, prompt and completion token ids, per-token sampling log-probabilities, finish reason,
weight version (of the oldest token), per-token weight versions (`token_versions`: partial rollouts;
null where the engine did not record them or in older logs), completion text, task metadata (JSON text: tasks carry different fields), reward
components (a map name -> value), the total reward and `reward_failed` (True: no reward worker scored
it, so both are null; older logs read back with it null); optionally the sampler's keep mask (kept
token ids per step), the indexer's selections (`indices`: the bytes of data/index_codec.py's exact
compact encoding, with their [T, L, K] shape in `indices_shape`; a log written when they were stored as a
flat int32 list reads back encoded the same) and the MoE
routing (`experts`: the ids' raw little-endian bytes, uint8 or int16 as the engine recorded them, with
their [P + T - 1, M, k] shape in `experts_shape`; the byte count over the element count is the item size,
so one id costs one byte for up to 256 experts, in memory and on disk, and the dtype comes back exact).

Completions are `dsarl.data.step_types.Completion`, the engines' output type.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .index_codec import PackedIndices, encode_indices
from .step_types import Completion

ROLLOUT_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("group_id", pa.string(), nullable=False),
    pa.field("prompt_index", pa.int64(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("completion_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("logprobs", pa.list_(pa.float32()), nullable=False),  # engines sample in fp32: exact
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("weight_version", pa.int64(), nullable=False),
    pa.field("token_versions", pa.list_(pa.int64())),  # per token: the weights that sampled it
    pa.field("text", pa.string(), nullable=False),
    pa.field("metadata", pa.string()),  # JSON object
    pa.field("reward_components", pa.map_(pa.string(), pa.float64())),
    pa.field("reward", pa.float64()),
    # True: no reward worker scored this completion (lost on every try), so `reward` and
    # `reward_components` are null and the learner never trained on it; False: scored; null: a log
    # written before this column existed, or no rewards given
    pa.field("reward_failed", pa.bool_()),
    pa.field("keep_mask", pa.list_(pa.list_(pa.int32()))),
    pa.field("indices", pa.large_binary()),  # PackedIndices.data
    pa.field("indices_shape", pa.list_(pa.int32())),
    pa.field("experts", pa.large_binary()),  # large: a step's routing can pass 2 GiB (int32 offsets)
    pa.field("experts_shape", pa.list_(pa.int32())),
])
# item size -> (little-endian numpy dtype, torch dtype) of recorded expert ids
EXPERT_ID_DTYPES = {1: (np.dtype("<u1"), torch.uint8), 2: (np.dtype("<i2"), torch.int16),
                    4: (np.dtype("<i4"), torch.int32)}


def experts_to_bytes(experts: torch.Tensor) -> bytes:
    """[S, M, k] uint8 / int16 / int32 expert ids -> their little-endian bytes."""
    np_dtype, dtype = EXPERT_ID_DTYPES[experts.element_size()]
    assert experts.dtype == dtype, f"expert ids must be uint8, int16 or int32, got {experts.dtype}"
    return experts.contiguous().numpy().astype(np_dtype, copy=False).tobytes()


def experts_from_bytes(data: bytes, shape: list[int]) -> torch.Tensor:
    """The inverse of experts_to_bytes: the item size is the byte count over the element count."""
    np_dtype, _ = EXPERT_ID_DTYPES[len(data) // math.prod(shape)]
    ids = np.frombuffer(data, dtype=np_dtype).astype(np_dtype.newbyteorder("="))  # a native, writable copy
    return torch.from_numpy(ids).view(*shape)


@dataclass
class RolloutRecord:
    """A completion with what the driver adds to it."""

    completion: object  # dsarl.actors.engine.types.Completion
    prompt_id: str
    group_id: str
    metadata: dict = field(default_factory=dict)
    reward_components: dict[str, float] | None = None
    reward: float | None = None
    reward_failed: bool | None = None  # see ROLLOUT_SCHEMA's reward_failed


def completions_to_table(completions, prompt_ids: list[str] | None = None, group_ids: list[str] | None = None,
                         metadata: list[dict] | None = None, reward_components: list[dict] | None = None,
                         rewards: list[float | None] | None = None,
                         reward_failed: list[bool] | None = None) -> pa.Table:
    """Completions (+ per-completion lists of the driver's fields) -> a table of ROLLOUT_SCHEMA.
    Defaults: prompt_id = group_id = str(prompt_index), no metadata, no rewards."""
    n = len(completions)
    for name, col in [("prompt_ids", prompt_ids), ("group_ids", group_ids), ("metadata", metadata),
                      ("reward_components", reward_components), ("rewards", rewards),
                      ("reward_failed", reward_failed)]:
        if col is not None and len(col) != n:
            raise ValueError(f"{name} has {len(col)} entries for {n} completions")
    pid = prompt_ids or [str(c.prompt_index) for c in completions]
    cols = {
        "prompt_id": pid,
        "group_id": group_ids or list(pid),
        "prompt_index": [c.prompt_index for c in completions],
        "sample_index": [c.sample_index for c in completions],
        "prompt_token_ids": [list(c.prompt_ids) for c in completions],
        "completion_token_ids": [list(c.token_ids) for c in completions],
        "logprobs": [list(c.logprobs) for c in completions],
        "finish_reason": [c.finish_reason for c in completions],
        "weight_version": [c.weight_version for c in completions],
        "token_versions": [None if c.token_versions is None else list(c.token_versions) for c in completions],
        "text": [c.text for c in completions],
        "metadata": [json.dumps(m, default=str) for m in metadata] if metadata else [None] * n,  # dates etc.
        "reward_components": [list(r.items()) if r is not None else None for r in reward_components]
        if reward_components else [None] * n,
        "reward": rewards or [None] * n,
        "reward_failed": reward_failed or [None] * n,
        "keep_mask": [c.keep_mask for c in completions],
        "indices": [None if c.indices is None else c.indices.data for c in completions],
        "indices_shape": [None if c.indices is None else list(c.indices.shape) for c in completions],
        "experts": [None if c.experts is None else experts_to_bytes(c.experts) for c in completions],
        "experts_shape": [None if c.experts is None else list(c.experts.shape) for c in completions],
    }
    return pa.Table.from_pydict(cols, schema=ROLLOUT_SCHEMA)


def with_current_columns(table: pa.Table) -> pa.Table:
    """A table of an older log as ROLLOUT_SCHEMA: the nullable columns added since come back all null
    (reward_failed null: "not recorded", never a made-up False); raw int32 selections come back encoded."""
    if "indices" in table.schema.names and pa.types.is_list(table.schema.field("indices").type):
        table = _encode_legacy_indices(table)
    for f in ROLLOUT_SCHEMA:
        if f.name not in table.schema.names:
            if not f.nullable:
                raise ValueError(f"rollout table has no {f.name!r} column (columns: {table.schema.names})")
            table = table.append_column(f, pa.nulls(len(table), f.type))
    return table.select(ROLLOUT_SCHEMA.names).cast(ROLLOUT_SCHEMA)  # raises naming a mismatching field


def _encode_legacy_indices(table: pa.Table) -> pa.Table:
    """An `indices` column of flat int32 lists (logs before the codec) -> the encoded bytes."""
    flat, shapes = table.column("indices").to_pylist(), table.column("indices_shape").to_pylist()
    packed = [None if f is None else encode_indices(np.asarray(f, dtype=np.int32).reshape(sh)).data
              for f, sh in zip(flat, shapes)]
    i = table.schema.get_field_index("indices")
    return table.set_column(i, pa.field("indices", pa.large_binary()), pa.array(packed, pa.large_binary()))


def table_to_records(table: pa.Table) -> list[RolloutRecord]:
    table = with_current_columns(table)
    out = []
    for row in table.to_pylist():
        idx = row["indices"]
        indices = None if idx is None else PackedIndices(tuple(row["indices_shape"]), idx)  # decode(): the tensor
        experts = None if row["experts"] is None else experts_from_bytes(row["experts"], row["experts_shape"])
        comp = Completion(
            prompt_index=row["prompt_index"], sample_index=row["sample_index"],
            prompt_ids=row["prompt_token_ids"], token_ids=row["completion_token_ids"], logprobs=row["logprobs"],
            finish_reason=row["finish_reason"], text=row["text"], weight_version=row["weight_version"],
            keep_mask=row["keep_mask"], indices=indices, experts=experts, token_versions=row["token_versions"],
        )
        rc = row["reward_components"]
        out.append(RolloutRecord(comp, row["prompt_id"], row["group_id"],
                                 json.loads(row["metadata"]) if row["metadata"] else {},
                                 dict(rc) if rc is not None else None, row["reward"], row["reward_failed"]))
    return out


def table_to_completions(table: pa.Table) -> list:
    return [r.completion for r in table_to_records(table)]


def write_rollouts(table: pa.Table, path) -> None:
    """Writes to a temporary name beside `path`, then renames: a kill mid-write leaves no torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_rollouts(path) -> pa.Table:
    """A rollout log as a table of ROLLOUT_SCHEMA; columns added since it was written come back null."""
    return with_current_columns(pq.read_table(str(path)))
