"""Optional lm-evaluation-harness tasks for the layer-removal sweep (``pip install lns-surgery[eval]``).

Each task runs on the model as it is and once per block with that block bypassed (the same bypass
as the perplexity sweep), with lm-eval's ``HFLM`` wrapped around the model already in memory.

Tasks are given as lm-eval names (``arc_easy``, a group such as ``mmlu``, a tag, a glob pattern
such as ``arc_*``), as task YAML files, or by name from task folders passed as ``include`` (lm-eval's
``TaskManager(include_path=...)``, the ``--tasks-include`` of ``lns-surgery analyze``). They are all
resolved, built and their documents loaded once, before any model is evaluated
(``resolve_tasks``), so that a misspelt name or a broken YAML file fails in one line and nothing is
run. Results are keyed by the task's own name (``task:`` in its YAML), whatever form it was given
in, and a task for which lm-eval returns no metric is an error, never an empty entry.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from lns_surgery.core.errors import LNSError, first_line

YAML_SUFFIXES = (".yaml", ".yml")


def require_lm_eval() -> None:
    """Fail early, with the install command, when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise LNSError("--tasks needs lm-eval-harness: pip install 'lns-surgery[eval]'") from None


def parse_tasks(tasks) -> list[str]:
    """Task specifications from a comma-separated string or a list, stripped and de-duplicated."""
    if tasks is None:
        return []
    if isinstance(tasks, TaskPlan):
        return list(tasks.specs)
    if isinstance(tasks, (str, Path)):
        tasks = str(tasks).split(",")
    names = [str(name).strip() for name in tasks if name and str(name).strip()]
    return list(dict.fromkeys(names))


def parse_includes(include) -> list[str]:
    """Task folders (``--tasks-include``) as a list of paths; each must be an existing folder."""
    if include is None:
        return []
    if isinstance(include, (str, Path)):
        include = [include]
    folders = []
    for item in include:
        if item is None or not str(item).strip():
            continue
        path = Path(str(item).strip()).expanduser()
        if not path.exists():
            raise LNSError(f"--tasks-include: no such folder: '{item}'")
        if not path.is_dir():
            raise LNSError(f"--tasks-include takes a folder of lm-eval task YAML files; give the file '{item}' to --tasks instead")
        folders.append(str(path.resolve()))
    return list(dict.fromkeys(folders))


@dataclass
class TaskPlan:
    """Tasks resolved by lm-eval, ready to run: what to hand ``simple_evaluate`` and the names its
    results come back under."""

    specs: list[str]                  # as given (YAML files made absolute, patterns expanded)
    tasks: list[str]                  # leaf task names: each must come back with metrics
    groups: list[str] = field(default_factory=list)  # group names: reported when lm-eval aggregates them
    include: list[str] = field(default_factory=list)
    manager: object = field(default=None, repr=False)  # lm_eval.tasks.TaskManager

    @property
    def names(self) -> list[str]:
        return self.groups + self.tasks


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith(YAML_SUFFIXES) or "/" in spec or "\\" in spec or Path(spec).expanduser().exists()


def _unknown_name(spec: str, manager, include: list[str]) -> LNSError:
    known = list(getattr(manager, "all_tasks", []) or [])
    close = difflib.get_close_matches(spec, known, n=3)
    where = "lm-eval's own tasks" + (f" or in --tasks-include {', '.join(include)}" if include else "")
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    if not include and not close:
        hint = "; a task of your own needs its YAML file in --tasks, or its folder in --tasks-include"
    return LNSError(f"unknown lm-eval task '{spec}': not among {where}{hint}")


def _is_pattern(spec: str) -> bool:
    return any(char in spec for char in "*?[")


def _check_paths(specs: list[str]) -> list[str]:
    """YAML files checked and made absolute; a folder is refused with the fix. Needs no lm-eval index."""
    checked = []
    for spec in specs:
        if not _is_pattern(spec) and _looks_like_path(spec):
            path = Path(spec).expanduser()
            if path.is_dir():
                raise LNSError(f"'{spec}' is a folder: pass it with --tasks-include and name its tasks in --tasks")
            if not path.is_file():
                raise LNSError(f"no such lm-eval task file: '{spec}'")
            spec = str(path.resolve())
        checked.append(spec)
    return checked


def _expand_patterns(specs: list[str], manager) -> list[str]:
    expanded = []
    for spec in specs:
        if _is_pattern(spec) and not Path(spec).is_file():
            matches = manager.match_tasks([spec])
            if not matches:
                raise LNSError(f"no lm-eval task matches '{spec}'")
            expanded += matches
        else:
            expanded.append(spec)
    return list(dict.fromkeys(expanded))


def _quiet_lm_eval():
    """lm-eval warns once per metric without an explicit aggregation; keep only its errors."""
    logger = logging.getLogger("lm_eval")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    return logger, previous


_MANAGERS: dict = {}


def _folder_signature(folders: list[str]) -> tuple:
    """What an include folder's index depends on: its YAML files, their sizes and times."""
    files = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix.lower() in YAML_SUFFIXES and path.is_file():
                stat = path.stat()
                files.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(folders), tuple(files)


def task_manager(folders: list[str], with_lm_eval_tasks: bool = True):
    """lm-eval's ``TaskManager`` over ``folders``, plus lm-eval's own tasks unless ``with_lm_eval_tasks``
    is False. Indexing lm-eval's ~15,000 task files takes seconds, so one is kept per process for each
    state of the folders."""
    from lm_eval.tasks import TaskManager

    # The class is part of the key: a manager built by one lm-eval (or a stand-in for it) is never
    # handed to another.
    key = (TaskManager, with_lm_eval_tasks, _folder_signature(folders))
    if key not in _MANAGERS:
        while len(_MANAGERS) >= 4:  # the oldest goes
            del _MANAGERS[next(iter(_MANAGERS))]
        _MANAGERS[key] = TaskManager(include_path=folders or None, include_defaults=with_lm_eval_tasks)
    return _MANAGERS[key]


class _NeedsLmEvalTasks(Exception):
    """A task could not be built from the task files and include folders alone; it is retried with
    lm-eval's own index."""


def _needs_lm_eval_tasks(specs: list[str], local_manager) -> bool:
    """Whether any spec is a name or pattern that the task files and include folders do not define."""
    local_names = set(getattr(local_manager, "all_tasks", None) or ())
    return any(_is_pattern(spec) or (spec not in local_names and not Path(spec).is_file()) for spec in specs)


def _build_tasks(specs: list[str], manager, folders: list[str], local_only: bool) -> dict:
    """``{"tasks": {name: Task}, "groups": {name: Group}}`` for ``specs``, built one at a time so that
    an error names the culprit."""
    built = {"tasks": {}, "groups": {}}
    for spec in specs:
        try:
            loaded = manager.load([spec])
        except Exception as exc:
            # Without lm-eval's index a group's member that only the index defines is taken for an
            # inline task and fails in its own way: every failure is retried with the index, whose
            # error, if any, is the one to report.
            if local_only:
                raise _NeedsLmEvalTasks from None
            _raise_build_error(spec, exc, manager, folders)
        for name, task in loaded["tasks"].items():
            if name in built["tasks"]:
                raise LNSError(f"lm-eval task '{name}' is asked for twice (directly, or through a group or tag)")
            built["tasks"][name] = task
        built["groups"].update(loaded.get("groups") or {})
    return built


def _raise_build_error(spec: str, exc: Exception, manager, folders: list[str]):
    """The one-line error for a task that lm-eval, its own index included, could not build."""
    if isinstance(exc, KeyError):
        if spec in set(getattr(manager, "all_tasks", None) or ()) or Path(spec).is_file():
            raise LNSError(f"lm-eval could not build task '{spec}': {first_line(exc)}") from None
        raise _unknown_name(spec, manager, folders) from None
    # a broken YAML file, a dataset that cannot be loaded, ...
    raise LNSError(f"lm-eval could not build task '{spec}': {type(exc).__name__}: {first_line(exc)}") from None


def resolve_tasks(tasks, include=None) -> TaskPlan | None:
    """Resolve, build and load every task (names, YAML files, or names from ``include`` folders)
    before any model runs; ``None`` when there are none. One-line ``LNSError`` on any problem.

    Tasks that the YAML files and include folders define on their own are resolved without indexing
    lm-eval's own task collection, which takes seconds; names, patterns and references beyond them use it."""
    if isinstance(tasks, TaskPlan):
        return tasks
    specs = parse_tasks(tasks)
    folders = parse_includes(include)
    if not specs:
        if folders:
            raise LNSError("--tasks-include needs --tasks: name the tasks to run from it")
        return None
    specs = _check_paths(specs)
    require_lm_eval()

    logger, previous = _quiet_lm_eval()
    try:
        manager = task_manager(folders, with_lm_eval_tasks=False)
        for folder in folders:
            index = getattr(manager, "task_index", None)
            if index is not None and not any(str(entry.yaml_path or "").startswith(folder.rstrip(os.sep) + os.sep)
                                             for entry in index.values()):
                raise LNSError(f"--tasks-include '{folder}' defines no lm-eval task (no readable YAML file with a 'task:' or 'group:')")
        local_only = not _needs_lm_eval_tasks(specs, manager)
        if local_only:
            try:
                built = _build_tasks(specs, manager, folders, local_only=True)
            except _NeedsLmEvalTasks:
                local_only = False
        if not local_only:
            manager = task_manager(folders)
            specs = _expand_patterns(specs, manager)
            built = _build_tasks(specs, manager, folders, local_only=False)
        for name, task in built["tasks"].items():
            try:
                count = len(task.eval_docs)
            except Exception as exc:
                raise LNSError(f"lm-eval task '{name}' has no documents to evaluate: {first_line(exc)}") from None
            if count == 0:
                raise LNSError(f"lm-eval task '{name}' has no documents to evaluate")
    finally:
        logger.setLevel(previous)
    return TaskPlan(specs=specs, tasks=list(built["tasks"]), groups=list(built["groups"]), include=folders, manager=manager)


@contextlib.contextmanager
def _without_environment_report():
    """``simple_evaluate`` records the environment (``pip list``, GPU and OS details, in a dozen
    subprocesses, one to two seconds) on every call; the sweep calls it once per block and keeps
    only the metrics, so that record is skipped."""
    try:
        from lm_eval import evaluator
    except ImportError:  # an lm-eval laid out differently: nothing to skip
        evaluator = None
    original = getattr(evaluator, "add_env_info", None)
    if original is None:
        yield
        return
    evaluator.add_env_info = lambda results: None
    try:
        yield
    finally:
        evaluator.add_env_info = original


def _numbers(metrics: dict) -> dict:
    """lm-eval's metrics for one task (``"acc,none": 0.61``), numbers only, filter suffix dropped.

    Keys without a filter (``sample_len``, ``alias``) are bookkeeping, not metrics."""
    kept = {}
    for key, value in metrics.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, _, filter_name = key.partition(",")
        kept[name if filter_name in ("", "none") else key] = float(value)
    return kept


def evaluate_tasks(model, tokenizer, tasks, *, batch_size: int = 8, limit: int | None = None, include=None) -> dict:
    """``{task: {metric: value}}`` from lm-eval for ``model`` as it is now; ``tasks`` is a
    ``TaskPlan`` (from ``resolve_tasks``) or what ``resolve_tasks`` takes."""
    plan = resolve_tasks(tasks, include)
    if plan is None:
        return {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    logger, previous = _quiet_lm_eval()
    try:
        harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with _without_environment_report():
            output = lm_eval.simple_evaluate(model=harness_model, tasks=list(plan.specs), limit=limit,
                                             task_manager=plan.manager)
    except (KeyError, ValueError) as exc:
        raise LNSError(f"lm-eval could not run {', '.join(plan.specs)}: {first_line(exc)}") from None
    finally:
        logger.setLevel(previous)
    results = (output or {}).get("results") or {}
    found = {}
    for name in plan.names:
        numbers = _numbers(results.get(name) or {})
        if numbers:
            found[name] = numbers
        elif name in plan.tasks:
            raise LNSError(f"lm-eval returned no metrics for task '{name}' (it has no metric_list, or every metric failed)")
    return found


def removal_task_sweep(model, tokenizer, tasks, *, batch_size: int = 8, limit: int | None = None,
                       progress: bool = False, description: str | None = None, include=None) -> tuple[dict, list[dict]]:
    """The tasks' metrics for the whole model and for the model with each block bypassed."""
    from tqdm.auto import tqdm

    from lns_surgery.analysis.measures import block_layout, skip_blocks

    plan = resolve_tasks(tasks, include)
    count = len(block_layout(model).blocks)
    whole = evaluate_tasks(model, tokenizer, plan, batch_size=batch_size, limit=limit)
    per_block = []
    for index in tqdm(range(count), desc=description, unit="block", disable=not progress, leave=False):
        with skip_blocks(model, [index]):
            per_block.append(evaluate_tasks(model, tokenizer, plan, batch_size=batch_size, limit=limit))
    return whole, per_block
