"""Every ```yaml block of README.md and docs/*.md loads as a config.

A block is a whole stage config or a fragment of one (`rewards:`, `rollout:`, ...): its top-level keys
pick the first stage whose schema has them all, and the block, merged onto that stage's defaults by
load_config, must load. A block whose keys no stage has (a renamed or imagined key) fails here.
"""
import re
from pathlib import Path

import pytest
import yaml

from dsarl.launch.config import load_config
from dsarl.launch.stage_config import STAGE_SCHEMAS, stage_schema

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```ya?ml[ \t]*\n(.*?)^```", re.M | re.S)
# which stage a fragment belongs to when several have its keys: the one the docs mostly describe first
STAGE_ORDER = ("grpo", "run", "distill", "pretrain", "warmup", "sparse", "eval")


def yaml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            blocks.append((f"{doc.relative_to(ROOT)}:{line}", m.group(1)))
    return blocks


def stage_for(keys: set[str]) -> str | None:
    from dataclasses import fields

    assert set(STAGE_ORDER) == set(STAGE_SCHEMAS)
    return next((s for s in STAGE_ORDER if keys <= {f.name for f in fields(stage_schema(s))}), None)


def test_the_docs_have_yaml_blocks():
    where = {w.rsplit(":", 1)[0] for w, _ in yaml_blocks()}
    assert {"README.md", "docs/cluster.md"} <= where, where  # README's rewards, docs/cluster.md's resources


@pytest.mark.parametrize("where, block", yaml_blocks(), ids=[w for w, _ in yaml_blocks()])
def test_a_docs_yaml_block_loads_into_its_stage_config(where, block, tmp_path):
    raw = yaml.safe_load(block)
    assert isinstance(raw, dict) and raw, f"{where}: a config block is a non-empty mapping"
    stage = stage_for(set(raw))
    assert stage is not None, f"{where}: no stage config has all of the keys {sorted(raw)}"
    path = tmp_path / "block.yaml"
    path.write_text(block)
    cfg = load_config(stage_schema(stage), path)
    for key, value in raw.items():  # the block's values are what the stage gets, not dropped or renamed
        if not isinstance(value, dict):
            assert getattr(cfg, key) == value, (where, key)
