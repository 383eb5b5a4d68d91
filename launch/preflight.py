"""Checks a stage's config against the world before any Ray actor starts (DESIGN.md section 4).

Everything a run needs that a typed config cannot check by itself: reward names and their kwargs,
the rubric files named by kwargs and rows (and a judge where a rubric needs one), the accuracy
component, the data files (every row read and its prompt checked: UTF-8, a string or a chat of
string messages, at least one row, and a length that fits the model's context with
rollout.max_new_tokens) and the columns the rewards read, the checkpoint to start or resume from,
the optional packages the config asks for, and what the weight sync method needs. Each failure is a
`ConfigError` naming the config key and the file or value, raised before `init_ray`: found later,
each was a traceback from inside an actor wrapped in the driver's own, minutes into the run.

    check_grpo_config(cfg, resolve, resume)       dsarl grpo (and each specialist of dsarl distill)
    check_pipeline_config(cfg, resolve, resume)   dsarl run (configs/quickstart.yaml)
    check_distill_config(cfg, resolve, resume)    dsarl distill
    check_resume(resume, run_dir)                 every stage that checkpoints

Nothing here imports ray, builds a reward or a judge, or loads a model (only its tokenizer): it reads files
and signatures (rubrics are loaded by a judge-less RubricReward, so by the very rule the reward workers use).
"""
import contextlib
import importlib.util
import inspect
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from dsarl.data.prompts import load_prompts
from dsarl.learner.checkpointing import latest_checkpoint
from dsarl.models.config import ConfigError
from dsarl.rewards import registry
from dsarl.rewards.imports import import_attr
from dsarl.rewards.rubric import RubricReward
from dsarl.rewards.types import RewardSample

# files a model checkpoint holds (models/checkpoint.py) and a training checkpoint adds
# (learner/checkpointing.py); rng.pt is optional there, so it is not required here
MODEL_FILES = ("config.json", "model.safetensors")
TRAINING_FILES = (*MODEL_FILES, "optimizer.pt", "trainer_state.json")
# reward kwargs that name a column the reward reads with no fallback (a missing one raises per sample)
COLUMN_KWARGS = ("answer_key", "tests_key")
# config key -> (package to find, how to install it)
OPTIONAL_PACKAGES = {
    "wandb_project": ("wandb", 'pip install "dsarl[logging]"'),
    "mlflow_experiment": ("mlflow", 'pip install "dsarl[logging]"'),
}


@contextlib.contextmanager
def in_file(config_path: str | None):
    """Prefixes a ConfigError raised inside with the config file, so the message names both."""
    try:
        yield
    except ConfigError as e:
        if not config_path:
            raise
        raise ConfigError(f"{config_path}: {e}") from None


# ---- checkpoints --------------------------------------------------------------------------------
def check_checkpoint(path: str | Path, key: str, files: tuple[str, ...] = MODEL_FILES) -> None:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{key}: no checkpoint directory {path}")
    # the optimizer state is optimizer.pt (one process) or dcp/ (the sharded GRPO learner, any rank count)
    missing = [f for f in files if not (path / f).is_file() and not (f == "optimizer.pt" and (path / "dcp").is_dir())]
    if missing:
        raise ConfigError(f"{key}: {path} is not a complete checkpoint (missing {', '.join(missing)})")


def check_resume(resume: bool | str, run_dir: str | Path) -> None:
    """`--resume`: run_dir must hold a checkpoint; `--resume PATH`: PATH must be a complete one."""
    if isinstance(resume, str):
        check_checkpoint(resume, "--resume", TRAINING_FILES)
    elif resume and latest_checkpoint(run_dir) is None:
        raise ConfigError(f"--resume: no checkpoint in run_dir {run_dir} (looked for {Path(run_dir) / 'checkpoints'}"
                          "/step_*); drop --resume to start afresh, or pass --resume CHECKPOINT")


# ---- optional packages ----------------------------------------------------------------------------
def _need_package(package: str, install: str, why: str) -> None:
    if importlib.util.find_spec(package) is None:  # find, never import: vllm alone takes seconds to import
        raise ConfigError(f"{why} needs the package {package!r}, which is not installed: {install}")


def check_logging_packages(cfg, prefix: str = "") -> None:
    for key, (package, install) in OPTIONAL_PACKAGES.items():
        value = getattr(cfg, key, None)
        if value:
            _need_package(package, install, f"{prefix}{key}: {value!r}")


def check_packages(cfg, prefix: str = "") -> None:
    if cfg.rollout.engine == "vllm":
        _need_package("vllm", 'pip install "dsarl[vllm]"', f"{prefix}rollout.engine: vllm")
    check_logging_packages(cfg, prefix)


# ---- weight sync ----------------------------------------------------------------------------------
def check_sync(cfg, prefix: str = "") -> None:
    """sync.method and what the broadcast needs: the native engine (the vLLM engine loads weights in its
    own worker processes, outside the group) and, for nccl, a GPU on learner rank 0 and on every worker."""
    from dsarl.actors.weight_sync import SYNC_METHODS

    sync, ro = cfg.sync, cfg.rollout
    if sync.method not in SYNC_METHODS:
        raise ConfigError(f"{prefix}sync.method: {sync.method!r} is not one of {sorted(SYNC_METHODS)}")
    if sync.method != "broadcast":
        return
    if ro.engine == "vllm":
        raise ConfigError(f"{prefix}sync.method: broadcast works with rollout.engine native only (vLLM loads "
                          f"weights in its own processes, outside the broadcast group): use sync.method: "
                          f"object_store with rollout.engine: vllm")
    if sync.backend == "nccl" and not (cfg.learner_num_gpus > 0 and ro.num_gpus_per_worker > 0):
        raise ConfigError(f"{prefix}sync.backend: nccl needs a GPU on learner rank 0 and on every rollout worker "
                          f"(learner_num_gpus={cfg.learner_num_gpus}, rollout.num_gpus_per_worker="
                          f"{ro.num_gpus_per_worker}): use backend auto or gloo")


# ---- rewards --------------------------------------------------------------------------------------
def check_reward_components(rewards, prefix: str = "") -> None:
    """Names resolve and kwargs bind (no reward is built, no process starts): the registry's checks, one
    component at a time so the error names its index, then the whole config (unique labels, limits)."""
    for i, c in enumerate(rewards.components):
        try:
            registry.validate_component(c)
        except (ValueError, TypeError) as e:
            why = str(e).removeprefix(f"reward component {c.key!r}: ")  # the index and name are said here
            raise ConfigError(f"{prefix}rewards.components[{i}] ({c.name}): {why}") from None
    try:
        registry.validate_reward_config(rewards)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix}rewards.components: {e}") from None


def check_accuracy_component(cfg, prefix: str = "") -> None:
    keys = [c.key for c in cfg.rewards.components]
    key = cfg.accuracy_component
    if not any(key == k or key.startswith(f"{k}/") for k in keys):
        raise ConfigError(f"{prefix}accuracy_component: {key!r} is not a reward component's key "
                          f"(configured: {keys}); name one of them or its '<key>/<sub-score>'")


def _resolved_or_none(name: str):
    """The class or function a (validated) reward name stands for, not built; None if it cannot resolve."""
    try:
        return registry.resolve_reward(name)
    except ValueError:
        return None


def check_reward_columns(rewards, rows: list[dict], source: str, prefix: str = "") -> None:
    """Columns a reward reads by a `*_key` kwarg (or its default) exist in every row of `source`."""
    for i, c in enumerate(rewards.components):
        obj = _resolved_or_none(c.name)
        if obj is None:
            continue
        params = inspect.signature(obj).parameters
        for kw in COLUMN_KWARGS:
            if kw not in params:
                continue
            column = c.kwargs.get(kw, params[kw].default)
            if not isinstance(column, str):
                continue
            missing = next((j for j, row in enumerate(rows) if column not in row), None)
            if missing is not None:
                raise ConfigError(f"{prefix}rewards.components[{i}] ({c.name}) reads column {column!r} ({kw}), "
                                  f"which row {missing} of {source} lacks (columns: {sorted(rows[missing])})")


def _rubric_components(rewards):
    for i, c in enumerate(rewards.components):
        obj = _resolved_or_none(c.name)
        if inspect.isclass(obj) and issubclass(obj, RubricReward):
            yield i, c


def check_rubrics(rewards, rows_by_source: dict[str, list[dict]], prefix: str = "") -> None:
    """Every rubric a rubric reward will load (its `rubric` kwarg, each row's `rubric_key` column) loads;
    one with judge criteria needs a `judge` kwarg that resolves. The judge itself is not built here."""
    for i, c in _rubric_components(rewards):
        where = f"{prefix}rewards.components[{i}] ({c.name})"
        kwargs = {k: v for k, v in c.kwargs.items() if k not in ("judge", "judge_kwargs")}
        reward = RubricReward(**kwargs)
        try:
            rubrics = [reward.rubric_for(RewardSample("", "", 0, {}))] if kwargs.get("rubric") else []
        except ValueError as e:
            raise ConfigError(f"{where}: kwargs.rubric: {e}") from None
        for source, rows in rows_by_source.items():
            for j, row in enumerate(rows):
                try:
                    rubrics.append(reward.rubric_for(RewardSample("", "", 0, row)))
                except ValueError as e:  # RubricError: no such file, bad schema, no rubric at all
                    raise ConfigError(f"{where}: row {j} of {source}: {e}") from None
        judged = sorted({r.id for r in rubrics if any(cr.check == "judge" for cr in r.criteria)})
        judge = c.kwargs.get("judge")
        if judged and judge is None:
            raise ConfigError(f"{where}: rubric(s) {judged} have judge criteria but no judge is configured: "
                              "set kwargs.judge to a 'module:factory' that builds the judge engine")
        if judged and isinstance(judge, str):
            try:
                import_attr(judge)
            except ValueError as e:
                raise ConfigError(f"{where}: kwargs.judge: {e}") from None


# ---- data -----------------------------------------------------------------------------------------
def _rows(data, source, split, limit, key, resolve) -> tuple[str, list[dict]] | None:
    """(label, rows) read exactly as the GRPO driver reads them (load_prompts: prompt_key/answer_key applied)."""
    if source is None:
        return None
    try:
        rows = load_prompts(source, resolve, data.prompt_key, data.answer_key, split, limit, data.subset)
    except (ValueError, OSError) as e:  # no such file/name, missing prompt_key/answer_key column, bad chat, bad split
        raise ConfigError(f"{key}: {e}") from None
    if not rows:
        raise ConfigError(f"{key}: {source} (split {split!r}) has no rows")
    return f"{source} (split {split!r})", rows


def prompt_files(data, resolve, prefix: str = "") -> dict[str, list[dict]]:
    """{source: rows} of the data sources (train `path`, the test split or `test_path`); {} for a synthetic
    task, whose rows our own code makes. Reading them here costs one extra read of each at start."""
    if data.path is None and data.task is None:
        raise ConfigError(f"{prefix}data: set data.path (a data file, directory or datasets name) or data.task "
                          f"(a synthetic task)")
    test_key = f"{prefix}data.test_path" if data.test_path is not None else f"{prefix}data.test_split"
    test_source = data.test_path if data.test_path is not None else data.path if data.test_split else None
    files = [_rows(data, data.path, data.split, data.limit, f"{prefix}data.path", resolve),
             _rows(data, test_source, data.test_split or data.split, None, test_key, resolve)]
    return dict(filter(None, files))


def check_prompt_lengths(cfg, init: str, files: dict[str, list[dict]], prefix: str = "") -> None:
    """Every prompt, tokenized as the driver will (the checkpoint's tokenizer, data.prompt_format), fits the
    model's context with rollout.max_new_tokens, or data.overlong says what to do with it (skip, truncate);
    found in step 1, it crashed the step that sampled it, and `--resume` crashed again."""
    from dsarl.models import load_tokenizer

    from .prompt_tokens import fit_to_context, prompt_ids_for, prompt_token_limit

    try:
        limit = prompt_token_limit(init, cfg.model_overrides, cfg.rollout.max_new_tokens)
    except ValueError as e:
        raise ConfigError(f"{prefix}rollout.max_new_tokens: {e}") from None
    tokenizer = load_tokenizer(init)
    for source, rows in files.items():
        try:
            kept, over = fit_to_context(rows, prompt_ids_for(rows, tokenizer, cfg.data.prompt_format), limit,
                                        cfg.data.overlong, source)
        except ValueError as e:
            raise ConfigError(f"{prefix}data: {e}") from None
        if not kept:
            raise ConfigError(f"{prefix}data.overlong: skip: all {over} rows of {source} are longer than {limit} "
                              f"tokens")


# ---- stages ---------------------------------------------------------------------------------------
def _check_grpo(cfg, resolve, resume, init_pending: bool, prefix: str) -> None:
    check_packages(cfg, prefix)
    check_sync(cfg, prefix)
    check_reward_components(cfg.rewards, prefix)
    check_accuracy_component(cfg, prefix)
    files = prompt_files(cfg.data, resolve, prefix)
    for source, rows in files.items():
        check_reward_columns(cfg.rewards, rows, source, prefix)
    check_rubrics(cfg.rewards, files, prefix)
    if not init_pending:
        check_checkpoint(resolve(cfg.init_from), f"{prefix}init_from")
        check_engine_replay(cfg, resolve(cfg.init_from), prefix)
        check_prompt_lengths(cfg, resolve(cfg.init_from), files, prefix)
    check_resume(resume, cfg.run_dir)


def check_engine_replay(cfg, init: str, prefix: str = "") -> None:
    """vLLM records no indexer selections and (as dsarl drives it) no MoE routing: replaying either
    needs the native engine."""
    from dsarl.models.config import DSAConfig

    if cfg.rollout.engine != "vllm":
        return
    model = DSAConfig.from_file(Path(init) / "config.json").replace(**cfg.model_overrides)
    if model.attention == "sparse" and cfg.learner.use_sampler_indices:
        raise ConfigError(f"{prefix}rollout.engine: vllm returns no indexer selections, which index replay "
                          f"(learner.use_sampler_indices, on for this sparse model) needs: use engine native, or "
                          f"set learner.use_sampler_indices: false")
    if "sparse" in model.layer_mlp_types and cfg.learner.use_sampler_experts:
        raise ConfigError(f"{prefix}rollout.engine: vllm returns no expert routing, which routing replay "
                          f"(learner.use_sampler_experts, on for this MoE model) needs: use engine native, or "
                          f"set learner.use_sampler_experts: false")


def check_grpo_config(cfg, resolve=lambda p: p, resume: bool | str = False) -> None:
    """Raises ConfigError on the first thing `dsarl grpo` with this config would fail on after starting."""
    with in_file(cfg.config_path):
        _check_grpo(cfg, resolve, resume, init_pending=False, prefix="")


def _pipeline_resume(resume: bool | str, run_dir: str, parts: list[Path]) -> None:
    """A pipeline resumes by skipping what it finished and continuing its stages' checkpoints: one
    checkpoint path cannot say which stage it belongs to, and some part of run_dir must exist."""
    if isinstance(resume, str):
        raise ConfigError(f"--resume {resume}: a pipeline resumes from its run_dir ({run_dir}), not from one "
                          "checkpoint: pass --resume alone (and run_dir=... for another run)")
    if resume and not any(p.exists() for p in parts):
        raise ConfigError(f"--resume: nothing to resume in run_dir {run_dir} (none of "
                          f"{', '.join(str(p) for p in parts)} exists); drop --resume to start afresh")


def check_pipeline_config(cfg, resolve=lambda p: p, resume: bool | str = False) -> None:
    """`dsarl run`: the GRPO part starts from the pretraining this pipeline runs first."""
    root = Path(cfg.run_dir)
    with in_file(cfg.config_path):
        _pipeline_resume(resume, cfg.run_dir, [root / "pretrain" / "checkpoints", root / "pretrain" / "final",
                                               root / "grpo" / "checkpoints"])
        check_logging_packages(cfg.pretrain, "pretrain.")
        _check_grpo(cfg.grpo, resolve, False, init_pending=True, prefix="grpo.")


def check_distill_config(cfg, resolve=lambda p: p, resume: bool | str = False) -> None:
    """`dsarl distill`: the base and given specialists exist, every specialist's GRPO config checks out."""
    from dsarl.data.domains import get_domain

    from .distill_pipeline import specialist_config

    root = Path(cfg.run_dir)
    with in_file(cfg.config_path):
        _pipeline_resume(resume, cfg.run_dir, [root / "base", root / "specialists", root / "student"])
        if cfg.base is not None:
            check_checkpoint(resolve(cfg.base), "base")
        else:
            check_logging_packages(cfg.pretrain, "pretrain.")
        for i, entry in enumerate(cfg.domains):
            try:
                get_domain(entry.name)
            except ValueError as e:
                raise ConfigError(f"domains[{i}].name: {e}") from None
            if entry.checkpoint:
                check_checkpoint(resolve(entry.checkpoint), f"domains[{i}].checkpoint")
                continue
            try:
                g = specialist_config(cfg, entry, cfg.base or str(root / "base" / "final"))
            except (OmegaConfBaseException, ValueError) as e:  # a bad grpo_overrides key or value
                raise ConfigError(f"domains[{i}].grpo_overrides: {e}") from None
            _check_grpo(g, resolve, False, init_pending=True, prefix=f"domains[{i}] ({entry.name}) specialist: ")
