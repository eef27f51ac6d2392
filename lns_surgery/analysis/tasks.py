"""Optional lm-evaluation-harness tasks for the layer-removal sweep (``pip install lns-surgery[eval]``).

Each task runs on the model as it is and once per block with that block bypassed (the same bypass
as the perplexity sweep), with lm-eval's ``HFLM`` wrapped around the model already in memory.
"""

from __future__ import annotations

from lns_surgery.errors import LNSError


def require_lm_eval() -> None:
    """Fail early, with the install command, when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise LNSError("--tasks needs lm-eval-harness: pip install 'lns-surgery[eval]'") from None


def parse_tasks(tasks) -> list[str]:
    if tasks is None:
        return []
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [name.strip() for name in tasks if name and name.strip()]
    return list(dict.fromkeys(names))


def _numbers(metrics: dict) -> dict:
    """lm-eval's metrics for one task (``"acc,none": 0.61``), numbers only, filter suffix dropped."""
    kept = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            name, _, filter_name = key.partition(",")
            kept[name if filter_name in ("", "none") else key] = float(value)
    return kept


def evaluate_tasks(model, tokenizer, tasks: list[str], *, batch_size: int = 8, limit: int | None = None) -> dict:
    """``{task: {metric: value}}`` from lm-eval for ``model`` as it is now."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(model=harness_model, tasks=tasks, limit=limit)
    except (KeyError, ValueError) as exc:  # unknown task names and the like
        raise LNSError(f"lm-eval could not run {', '.join(tasks)}: {exc}") from None
    results = (output or {}).get("results", {})
    return {task: _numbers(results.get(task, {})) for task in tasks}


def removal_task_sweep(model, tokenizer, tasks: list[str], *, batch_size: int = 8, limit: int | None = None,
                       progress: bool = False, description: str | None = None) -> tuple[dict, list[dict]]:
    """The tasks' metrics for the whole model and for the model with each block bypassed."""
    from tqdm.auto import tqdm

    from lns_surgery.analysis.measures import block_layout, skip_blocks

    count = len(block_layout(model).blocks)
    whole = evaluate_tasks(model, tokenizer, tasks, batch_size=batch_size, limit=limit)
    per_block = []
    for index in tqdm(range(count), desc=description, unit="block", disable=not progress, leave=False):
        with skip_blocks(model, [index]):
            per_block.append(evaluate_tasks(model, tokenizer, tasks, batch_size=batch_size, limit=limit))
    return whole, per_block
