"""Training data: load a Hub or local dataset, recognise its format, and shape it for TRL's SFTTrainer.

Formats (``dataset_format``):
- ``text``: a ``text`` column, trained on every token (pre-training; packed).
- ``alpaca``: ``instruction``/``input``/``output`` records, turned into prompt/completion with the
  standard Alpaca prompt, so only the response (and EOS) carries loss.
- ``messages``: chat records (``messages``, or ShareGPT ``conversations``), rendered with the
  tokenizer's chat template or, for base models without one, ChatML with ``{% generation %}`` tags
  so that ``assistant_only_loss`` can train on the assistant turns alone.
- ``prompt_completion``: ``prompt``/``completion`` columns, trained on the completion.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lns_surgery.core.errors import LNSError, first_line
from lns_surgery.core.records import check_line_lengths

logger = logging.getLogger(__name__)

# The prompts of Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca, train.py), verbatim.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
# ChatML with the assistant's reply and its end-of-turn inside {% generation %}, so that
# return_assistant_tokens_mask (TRL's assistant_only_loss) marks exactly what the model must learn to say.
_CHATML = (
    "{%- for message in messages %}"
    "{{- 'START' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + 'END' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + 'END' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'STARTassistant\\n' }}{%- endif %}"
)


def chatml_template(start: str = CHATML_START, end: str = CHATML_END) -> str:
    """ChatML with generation tags; ``start``/``end`` replace its two markers (see ``template_for``)."""
    quote = lambda text: text.replace("\\", "\\\\").replace("'", "\\'")  # noqa: E731
    return _CHATML.replace("START", quote(start)).replace("END", quote(end))


CHATML_TEMPLATE = chatml_template()

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
# Files read a line at a time (a .json file may legitimately be one long line: a list of records).
_ONE_RECORD_PER_LINE = (".jsonl", ".txt")


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    if input and input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


# --- loading -------------------------------------------------------------------------------------


def _load_local(path: Path, split: str | None, streaming: bool):
    from datasets import load_dataset, load_from_disk

    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        data = load_from_disk(str(path))  # a folder written by Dataset.save_to_disk
        if hasattr(data, "keys"):
            if split not in data:
                raise LNSError(f"'{path}' has no split '{split}'; it has: {', '.join(data.keys())}")
            data = data[split]
        return data.to_iterable_dataset() if streaming else data
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_BUILDERS and p.is_file())
        if not files:
            raise LNSError(f"'{path}' holds no {', '.join(sorted(_LOCAL_BUILDERS))} files")
    builders = {_LOCAL_BUILDERS.get(f.suffix) for f in files}
    if None in builders or len(builders) != 1:
        raise LNSError(f"cannot read '{path}': expected .json, .jsonl, .txt, .parquet or .csv files of one kind")
    if all(f.stat().st_size == 0 for f in files):  # datasets fails on these with a bare StopIteration
        raise LNSError(f"'{path}' is empty: there is nothing to train on")
    for file in files:  # one record per line: a line too large to hold is refused before datasets reads it
        if file.suffix in _ONE_RECORD_PER_LINE:
            check_line_lengths(file)
    # a local file is one split: it is the training data, and evaluation comes from eval_fraction
    return load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train", streaming=streaming)


def load_split(name: str, config: str | None, split: str, streaming: bool):
    """One split of a Hub dataset or a local file/folder, as a ``datasets`` (Iterable)Dataset."""
    from datasets import load_dataset

    path = Path(os.path.expanduser(name))
    try:
        if path.exists():
            return _load_local(path, split, streaming)
        return load_dataset(name, config, split=split, streaming=streaming)
    except LNSError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError, StopIteration) as exc:
        raise LNSError(f"could not load dataset '{name}' (split {split}): {first_line(exc)}") from None
    except Exception as exc:  # datasets raises many kinds (DatasetNotFoundError, offline errors, ...)
        if type(exc).__module__.startswith(("datasets", "huggingface_hub", "requests", "httpx")):
            raise LNSError(f"could not load dataset '{name}' (split {split}): {first_line(exc)}") from None
        raise


def _take(dataset, count: int | None):
    from datasets import Dataset

    if count is None:
        return dataset
    if isinstance(dataset, Dataset):
        return dataset.select(range(min(count, len(dataset))))
    return dataset.take(count)


def load_datasets(args, seed: int = 42):
    """(train, eval or None) for a recipe, with the eval split, fraction or count it asks for."""
    from datasets import Dataset

    if not args.dataset_name:
        raise LNSError("the recipe needs dataset_name (a Hub dataset id or a local file or folder)")
    train = load_split(args.dataset_name, args.dataset_config, args.dataset_train_split, args.dataset_streaming)
    if isinstance(train, Dataset) and len(train) == 0:
        raise LNSError(f"'{args.dataset_name}' has no records in split '{args.dataset_train_split}': nothing to train on")
    evaluation = None
    if args.dataset_test_split:
        evaluation = load_split(args.dataset_name, args.dataset_config, args.dataset_test_split, args.dataset_streaming)
    elif not isinstance(train, Dataset):
        if args.eval_fraction > 0:
            raise LNSError("a streamed dataset has no length to take eval_fraction of: set max_eval_samples (held "
                           "out from the start of the stream) or dataset_test_split")
        if args.max_eval_samples:  # hold out the stream's first records
            evaluation, train = train.take(args.max_eval_samples), train.skip(args.max_eval_samples)
    elif args.eval_fraction > 0:
        parts = train.train_test_split(test_size=args.eval_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    return _take(train, args.max_train_samples), _take(evaluation, args.max_eval_samples) if evaluation is not None else None


# --- formats -------------------------------------------------------------------------------------


def column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:  # a stream whose features are unknown until read
        names = list(next(iter(dataset)).keys())
    return list(names)


def detect_format(columns, text_field: str = "text") -> str:
    """The format a dataset's columns imply; a readable error when they fit none."""
    columns = set(columns)
    if "messages" in columns or "conversations" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if text_field in columns:
        return "text"
    raise LNSError(
        f"cannot tell the dataset's format from its columns ({', '.join(sorted(columns))}); expected '{text_field}', "
        "'instruction'+'output' (alpaca), 'prompt'+'completion' or 'messages'; set dataset_format"
    )


_REQUIRED = {
    "text": lambda field: {field},
    "alpaca": lambda field: {"instruction", "output"},
    "prompt_completion": lambda field: {"prompt", "completion"},
}


def _to_prompt_completion(record):
    return {"prompt": alpaca_prompt(record["instruction"], record.get("input")), "completion": record["output"]}


def prepare_dataset(dataset, data_format: str, text_field: str = "text"):
    """Reshape ``dataset`` into the columns SFTTrainer expects for ``data_format`` (others are dropped)."""
    if dataset is None:
        return None
    columns = column_names(dataset)
    if data_format == "auto":
        data_format = detect_format(columns, text_field)
    if data_format == "messages":
        keep = "messages" if "messages" in columns else "conversations"
        if keep not in columns:
            raise LNSError(f"dataset_format messages needs a 'messages' (or 'conversations') column; it has: {', '.join(columns)}")
        return dataset.remove_columns([c for c in columns if c not in (keep, "tools")]), data_format
    missing = _REQUIRED[data_format](text_field) - set(columns)
    if missing:
        raise LNSError(f"dataset_format {data_format} needs column(s) {', '.join(sorted(missing))}; "
                       f"the dataset has: {', '.join(columns)}")
    if data_format == "alpaca":
        return dataset.map(_to_prompt_completion, remove_columns=columns), data_format
    keep = {text_field} if data_format == "text" else {"prompt", "completion"}
    return dataset.remove_columns([c for c in columns if c not in keep]), data_format


# --- tokenizer: pad token and chat template ------------------------------------------------------


def chatml_for(tokenizer) -> str:
    """ChatML for this tokenizer. A base model's vocabulary rarely has ``<|im_start|>``/``<|im_end|>``:
    then its own BOS and EOS mark the turns, so no token is added (new rows would start untrained, and a
    LoRA run could not train them) and generation stops at the EOS it already knows."""
    vocab = tokenizer.get_vocab()
    if CHATML_START in vocab and CHATML_END in vocab:
        return CHATML_TEMPLATE
    if tokenizer.eos_token is None:
        raise LNSError("the tokenizer has neither ChatML's <|im_end|> nor an EOS token to end chat turns with; "
                       "give a chat_template")
    return chatml_template(tokenizer.bos_token or "", tokenizer.eos_token)


def resolve_chat_template(value: str, tokenizer=None) -> str:
    if value.lower() == "chatml":
        return chatml_for(tokenizer) if tokenizer is not None else CHATML_TEMPLATE
    path = Path(os.path.expanduser(value))
    if path.suffix in (".jinja", ".j2"):
        if not path.is_file():
            raise LNSError(f"chat template file '{path}' not found")
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise LNSError(f"chat_template must be 'chatml', a .jinja file or a Jinja template string; got '{value}'")


def prepare_tokenizer(tokenizer, model, data_format: str, chat_template: str | None = None) -> list[int]:
    """Give the tokenizer a pad token and (for chat data) a chat template; returns the ids of tokens it
    had to add (only a pad token, for a tokenizer without EOS and UNK: padding never carries loss)."""
    template = resolve_chat_template(chat_template, tokenizer) if chat_template else None
    if template is None and data_format == "messages" and not tokenizer.chat_template:
        logger.info("the tokenizer has no chat template: using ChatML")
        template = chatml_for(tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    added = []
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss, so eos is safe
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            model.resize_token_embeddings(len(tokenizer))
            added.append(tokenizer.pad_token_id)
    if template is not None and CHATML_END in template and CHATML_END in tokenizer.get_vocab():
        # generation must stop at the end of the assistant's turn
        end_id = tokenizer.convert_tokens_to_ids(CHATML_END)
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if end_id not in eos:
            model.generation_config.eos_token_id = [*eos, end_id]
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return added
