"""``analyze`` (models on disk -> report folder) and ``analyze_model`` (one model in memory -> dict)."""

from __future__ import annotations

import gc
from pathlib import Path

from lns_surgery.analysis import report as report_module
from lns_surgery.analysis.data import describe_source, token_windows
from lns_surgery.core.errors import LNSError, first_line
from lns_surgery.core.lns_status import lns_status

DEFAULT_MAX_TOKENS = 100_000
DEFAULT_SEQ_LEN = 512
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_seq_len(seq_len: int | None, config, name: str) -> int:
    """``seq_len``, or the default capped by the model; refuse lengths the model cannot take."""
    from lns_surgery.analysis.measures import max_positions

    limit = max_positions(config)
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
    if seq_len < 2:
        raise LNSError("--seq-len must be at least 2")
    if limit is not None and seq_len > limit:
        raise LNSError(f"--seq-len {seq_len} is longer than '{name}' supports ({limit} positions)")
    return seq_len


def check_vocabulary(windows, model, name: str) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer that is not the model's)."""
    rows = model.get_input_embeddings().weight.shape[0]
    largest = int(windows.max())
    if largest >= rows:
        raise LNSError(f"token id {largest} is outside the vocabulary of '{name}' ({rows} tokens): is the tokenizer the model's?")


def analyze_model(
    model,
    windows_or_tokenizer,
    data=None,
    *,
    name: str | None = None,
    seq_len: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    last_token: bool = False,
    removal: bool = True,
    tasks=None,
    tasks_limit: int | None = None,
    tasks_include=None,
    tokenizer=None,
    text_field: str = "text",
    split: str = "validation",
    progress: bool = False,
    source: str | None = None,
) -> dict:
    """Depth measures of one model in memory, as a report entry (see ``lns_surgery.analysis``).

    ``windows_or_tokenizer`` is either a ``[N, T]`` LongTensor of token ids, or a tokenizer, in which
    case ``data`` (a file, Hub dataset or list of strings) is tokenised into windows of ``seq_len``
    (at most ``max_tokens`` tokens). Nothing is written to disk; the model is left as it was.
    ``tasks`` (lm-eval names, task YAML files, or names from the task folders ``tasks_include``)
    also need a tokenizer; they are all resolved before the model runs. ``source`` is the checkpoint
    the effective LNS scales are measured against (default: the one an LNS model records).
    """
    import torch

    from lns_surgery.analysis.effective_scales import effective_scales
    from lns_surgery.analysis.measures import depth_measures, unwrap
    from lns_surgery.analysis.tasks import removal_task_sweep, resolve_tasks

    base = unwrap(model)
    name = name or getattr(base.config, "name_or_path", None) or type(base).__name__
    task_plan = resolve_tasks(tasks, tasks_include)
    if isinstance(windows_or_tokenizer, torch.Tensor):
        windows = windows_or_tokenizer.long()
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise LNSError("windows must be a [number, length >= 2] tensor of token ids")
        resolve_seq_len(windows.shape[1], base.config, name)
        data_name = f"{len(windows)} windows given in memory"
    else:
        tokenizer = windows_or_tokenizer
        if data is None:
            raise LNSError("give the data to tokenise (a file, a Hub dataset or a list of strings)")
        seq_len = resolve_seq_len(seq_len, base.config, name)
        windows = token_windows(tokenizer, data, seq_len, max_tokens, text_field=text_field, split=split)
        data_name = describe_source(data)
    if task_plan is not None and tokenizer is None:
        raise LNSError("lm-eval tasks need the model's tokenizer")
    check_vocabulary(windows, base, name)

    measured = depth_measures(model, windows, batch_size=batch_size, last_token=last_token, removal=removal,
                              progress=progress, description=name)
    status = lns_status(base.config)
    count = measured["num_layers"]
    scales = status.scales(count)
    effective = effective_scales(model, source)
    whole_tasks, block_tasks = None, [None] * count
    if task_plan is not None:
        whole_tasks, block_tasks = removal_task_sweep(model, tokenizer, task_plan, batch_size=batch_size,
                                                      limit=tasks_limit, progress=progress, description=f"{name} tasks")
    layers = []
    for index in range(count):
        removal_loss = measured["removal_loss"][index]
        entry = {
            "index": index,
            "block": index + 1,
            "lns_scale": scales[index],
            "output_variance": measured["variance"][index + 1],
            "residual_norm": measured["residual_norm"][index + 1],
            "attention_update_norm": measured["attention_update_norm"][index],
            "mlp_update_norm": measured["mlp_update_norm"][index],
            "angular_distance_next": measured["angular_distance"][index][0],
            "removal_perplexity": measured["removal_perplexity"][index],
            "removal_loss_increase": None if removal_loss is None else removal_loss - measured["loss"],
        }
        if task_plan is not None:
            entry["removal_tasks"] = block_tasks[index]
        if effective is not None:
            entry["effective_scale"] = dict(zip(effective["norms"], effective["per_block"][index]))
        layers.append(entry)
    return {
        "name": str(name),
        "status": status.kind,
        "lns_alpha": status.alpha,
        "model_type": getattr(base.config, "model_type", None),
        "num_layers": count,
        "num_parameters": sum(p.numel() for p in base.parameters()),
        "dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
        "data": data_name,
        "windows": measured["windows"],
        "seq_len": measured["seq_len"],
        "tokens": measured["tokens"],
        "perplexity": measured["perplexity"],
        "loss": measured["loss"],
        "embedding_variance": measured["variance"][0],
        "angular_distance_tokens": "last" if last_token else "all",
        "angular_distance": measured["angular_distance"],
        "tasks": whole_tasks,
        "effective_scales_source": effective["source"] if effective is not None else None,
        "layers": layers,
    }


def _pick_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise LNSError(f"unknown device '{device}': {exc}") from None


def _load_dtype(dtype: str, device):
    import torch

    if dtype not in DTYPES:
        raise LNSError(f"unknown dtype '{dtype}'; expected one of {', '.join(DTYPES)}")
    if dtype == "auto":  # full precision on CPU, the checkpoint's own precision on an accelerator
        return torch.float32 if device.type == "cpu" else "auto"
    return getattr(torch, dtype)


def _model_folder(path: str) -> str:
    """A ``builtin:`` name becomes its folder; folders and Hub ids are passed on to from_pretrained."""
    from lns_surgery.core.sources import resolve_builtin

    return str(resolve_builtin(str(path)))


def _checkpoint_config(folder: str) -> dict:
    """The config.json of a local folder or Hub repository, read without loading the model."""
    import json

    from huggingface_hub import hf_hub_download

    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise LNSError(f"'{folder}' is a file; give the checkpoint's folder")
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise LNSError(f"'{folder}' has no config.json: not a Hugging Face model folder")
    else:
        from lns_surgery.core.sources import is_hub_id

        if not is_hub_id(folder):
            raise LNSError(f"no such model folder: '{folder}'")
        try:
            config_path = Path(hf_hub_download(folder, "config.json"))
        except Exception as exc:  # offline, unknown repository, gated, ...
            raise LNSError(f"'{folder}' is not a local folder and its config could not be fetched from the Hub: {first_line(exc)}") from None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LNSError(f"'{config_path}' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LNSError(f"'{config_path}' holds a JSON {type(config).__name__}, not an object of settings: not a model config")
    return config


def _local_inputs(models, data, tokenizer, tasks, tasks_include) -> list[Path]:
    """Every file or folder on this machine that ``analyze`` reads: the report may not touch any of them."""
    from lns_surgery.core.outputs import local_inputs

    candidates = [_model_folder(str(item)) for item in models if isinstance(item, (str, Path))]
    candidates += [data, tokenizer]
    candidates += [tasks_include] if isinstance(tasks_include, (str, Path)) else list(tasks_include or [])
    if isinstance(tasks, str):
        candidates += [name.strip() for name in tasks.split(",")]
    elif isinstance(tasks, (list, tuple)):
        candidates += [name for name in tasks if isinstance(name, (str, Path))]
    return local_inputs(*candidates)


class _ConfigView:
    def __init__(self, values: dict):
        self.__dict__.update(values)


def analyze(
    models,
    data,
    out,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seq_len: int | None = None,
    batch_size: int = 8,
    last_token: bool = False,
    tasks=None,
    tasks_limit: int | None = None,
    tasks_include=None,
    overwrite: bool = False,
    tokenizer=None,
    text_field: str = "text",
    split: str = "validation",
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    names: list[str] | None = None,
    progress: bool = True,
    source: str | None = None,
) -> dict:
    """Analyse each model (a folder, Hub id, ``builtin:`` name, or a model in memory) on ``data``
    and write ``report.json``, ``summary.md`` and the plots into the folder ``out``; returns the report.

    Every input is checked before the first model is loaded, and ``out`` appears only once everything
    is written (``overwrite`` replaces an existing folder). ``tokenizer`` (a tokenizer or a path) is
    used for every model; by default each model's own is loaded from its folder. ``tasks`` (lm-eval
    task names, task YAML files, or names of tasks in the folders ``tasks_include``) are resolved and
    their documents loaded before any model is, too. ``source`` (a folder) is the checkpoint each LNS
    model's effective scales are measured against, instead of the source it records.
    """
    import torch

    from lns_surgery import load_model, load_tokenizer
    from lns_surgery.analysis.measures import unwrap
    from lns_surgery.analysis.tasks import parse_tasks, resolve_tasks
    from lns_surgery.core.outputs import atomic_output_dir, check_output

    if isinstance(models, (str, Path)) or hasattr(models, "config"):
        models = [models]
    models = list(models)
    if not models:
        raise LNSError("give at least one model to analyse")
    if names is not None and len(names) != len(models):
        raise LNSError("give one name per model")
    out = Path(out)
    inputs = _local_inputs([*models, *([source] if source else [])], data, tokenizer, tasks, tasks_include)
    if source is not None and not Path(_model_folder(str(source))).expanduser().is_dir():
        raise LNSError(f"--source '{source}' is not a checkpoint folder on this machine")
    check_output(out, overwrite, inputs, report=True)
    if not isinstance(data, (str, Path)):
        data = list(data)  # every model reads the same documents
    if batch_size < 1:
        raise LNSError("--batch-size must be at least 1")
    task_plan = resolve_tasks(tasks, tasks_include)
    device = _pick_device(device)
    load_dtype = _load_dtype(dtype, device)

    # Everything a user can get wrong is checked before the first (possibly large) model is loaded.
    plans = []
    for position, item in enumerate(models):
        if isinstance(item, (str, Path)):
            folder = _model_folder(str(item))
            label = names[position] if names else str(item)
            config = _ConfigView(_checkpoint_config(folder))
            model_tokenizer = tokenizer if tokenizer is not None else folder
        else:
            folder = None
            config = unwrap(item).config
            label = names[position] if names else getattr(config, "name_or_path", None) or type(item).__name__
            model_tokenizer = tokenizer if tokenizer is not None else getattr(config, "name_or_path", None)
            if not model_tokenizer:
                raise LNSError(f"model {position + 1} is in memory and has no name_or_path: pass tokenizer=")
        model_seq_len = resolve_seq_len(seq_len, config, label)
        if isinstance(model_tokenizer, (str, Path)):
            model_tokenizer = load_tokenizer(str(model_tokenizer), trust_remote_code=trust_remote_code)
        windows = token_windows(model_tokenizer, data, model_seq_len, max_tokens, text_field=text_field, split=split)
        if folder is None:
            check_vocabulary(windows, unwrap(item), label)
        elif isinstance(getattr(config, "vocab_size", None), int) and int(windows.max()) >= config.vocab_size:
            raise LNSError(f"token id {int(windows.max())} is outside the vocabulary of '{label}' "
                           f"({config.vocab_size} tokens): is the tokenizer the model's?")
        plans.append({"label": label, "item": item, "folder": folder, "tokenizer": model_tokenizer, "windows": windows})

    entries = []
    for plan in plans:
        if plan["folder"] is not None:
            model = load_model(plan["folder"], dtype=load_dtype, trust_remote_code=trust_remote_code)
            model.to(device)
        else:
            model = plan["item"]
        entry = analyze_model(
            model, plan["windows"], name=plan["label"], batch_size=batch_size, last_token=last_token,
            tasks=task_plan, tasks_limit=tasks_limit, tokenizer=plan["tokenizer"], progress=progress,
            source=_model_folder(str(source)) if source else None,
        )
        entry["data"] = describe_source(data)
        entries.append(entry)
        if plan["folder"] is not None:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    settings = {"source": describe_source(data), "max_tokens": max_tokens, "seq_len": seq_len, "batch_size": batch_size,
                "last_token": last_token, "text_field": text_field, "split": split, "tasks": parse_tasks(tasks) or None,
                "tasks_include": (task_plan.include or None) if task_plan else None, "tasks_limit": tasks_limit}
    report = report_module.build_report(entries, settings)
    with atomic_output_dir(out, overwrite, inputs, report=True) as staging:
        report_module.write_outputs(report, staging)
    return report
