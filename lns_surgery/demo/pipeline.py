"""The end-to-end demo (``lns-surgery demo``): the whole job on the shipped base model, offline, on CPU.

    from lns_surgery.demo.pipeline import run_demo
    result = run_demo("demo-out", quick=True)
    result.stages["heal"]["heldout_perplexity"], result.summary_path

Six stages, each a call to the package's public API, each measured on the same held-out text and the
same instruction evaluation split (``lns_surgery.demo.data``):

1. **base**: the shipped pretrained Pre-LN model (``builtin:demo``): held-out perplexity, exact-match
   accuracy on the instruction task, and the same questions asked the way its corpus phrases them
   (what it knows, independent of the instruction format);
2. **convert**: ``lns_surgery.convert`` (code mode): what the surgery alone does to perplexity;
3. **heal**: continued pre-training on the demo corpus with the scaling ramped in
   (``train_from_dict(..., command="pretrain")`` with ``lns_ramp_steps``);
4. **sft**: LoRA fine-tuning on the instruction task (``command="sft"``, prompt/completion data):
   exact-match accuracy before and after;
5. **analyze**: ``lns_surgery.analysis.analyze`` on the base, converted, healed and fine-tuned models
   (report.json, summary.md, plots);
6. **export**: the fine-tuned checkpoint reloaded in a fresh interpreter that cannot import this
   package, with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``; its logits
   and greedy answers are compared with the model in memory.

Everything is written to a hidden folder beside ``out`` and renamed to ``out`` at the end, so a
failed or interrupted run leaves nothing half-written there. ``summary.json`` and ``summary.md`` in
``out`` hold every figure and where each artefact is (paths relative to ``out``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lns_surgery.core import outputs
from lns_surgery.core.errors import LNSError
from lns_surgery.core.lns_status import lns_status
from lns_surgery.core.markdown import table
from lns_surgery.core.reports import json_safe

DEFAULT_OUT = "demo-out"
DEFAULT_BASE = "builtin:demo"
# Logits of the reloaded export may differ from the in-memory model's only by float summation order.
RELOAD_ATOL = 1e-4


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo's runs. ``scaled(f)`` multiplies the optimizer steps (not the evaluation sets).

    The defaults keep the whole demo near 1.5 minutes on two shared CPU cores. In a sweep on the shipped
    base (240 steps), healing at learning rate 3e-3 ended closest to the base's perplexity (5e-4: +6%,
    1e-3: +3%, 2e-3: +1.4%, 3e-3: +0.8%); LoRA for 400 steps at 1e-3 reached about twice the exact-match
    accuracy of 150 steps at 2e-3, and higher rates cost much more plain-text perplexity for little more.
    """

    seed: int = 0
    batch_size: int = 16
    # healing: continued pre-training on the demo corpus, LNS ramped in over the first heal_ramp_steps
    heal_steps: int = 240
    heal_ramp_steps: int = 120
    heal_learning_rate: float = 3e-3
    heal_documents: int = 8000
    # LoRA fine-tuning on the instruction task
    sft_steps: int = 400
    sft_learning_rate: float = 1e-3
    lora_r: int = 16
    lora_alpha: int = 32
    # evaluation: held-out documents for perplexity, tokens per model for the depth analysis
    heldout_documents: int = 1000
    analysis_tokens: int = 32 * 128

    def scaled(self, steps_scale: float) -> "DemoSettings":
        if steps_scale <= 0:
            raise LNSError(f"--steps-scale must be positive, got {steps_scale}")
        steps = lambda n: max(4, round(n * steps_scale))  # noqa: E731
        heal_steps = steps(self.heal_steps)
        return dataclasses.replace(
            self,
            heal_steps=heal_steps,
            heal_ramp_steps=max(1, min(heal_steps - 1, round(self.heal_ramp_steps * steps_scale))),
            sft_steps=steps(self.sft_steps),
        )


QUICK = DemoSettings(heal_steps=80, heal_ramp_steps=40, sft_steps=100, heal_documents=2000,
                     heldout_documents=300, analysis_tokens=16 * 128)


@dataclass
class DemoResult:
    """What the demo measured and wrote. ``stages`` maps base/convert/heal/sft/analyze/export to
    their figures (the same dicts as in ``summary.json``); paths in them are relative to ``out``."""

    out: Path
    stages: dict
    settings: DemoSettings
    wall_seconds: float
    summary: dict = field(default_factory=dict)

    @property
    def summary_path(self) -> Path:
        return self.out / "summary.json"


# --------------------------------------------------------------------------- helpers



def _write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _relative_change(new: float, old: float) -> float:
    return (new - old) / old


@contextmanager
def _quiet_libraries(threads: int):
    """One line per stage and the progress bars, without library chatter; ``threads`` torch threads.
    Everything it changes is restored afterwards (the demo may run inside a notebook)."""
    import warnings

    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), datasets.is_progress_bar_enabled()
    weight_bars = hf_logging.is_progress_bar_enabled()
    previous_threads = torch.get_num_threads()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()  # the Trainer's own bars stay
    hf_logging.disable_progress_bar()  # loading and writing weights takes no time here
    torch.set_num_threads(threads)
    # accelerate imports DeepSpeed wherever it is installed, and DeepSpeed then announces that it found no
    # GPU; the demo runs on the CPU and never uses DeepSpeed, so it is told the device up front.
    set_accelerator = "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available()
    if set_accelerator:
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
        if weight_bars:
            hf_logging.enable_progress_bar()
        if set_accelerator:
            os.environ.pop("DS_ACCELERATOR", None)
        torch.set_num_threads(previous_threads)


class _Console:
    """Prints one line when a stage starts and one with its outcome and duration."""

    def __init__(self, echo: Callable[[str], None], total: int):
        self.echo, self.total, self.number, self.started = echo, total, 0, 0.0

    def begin(self, title: str) -> None:
        self.number += 1
        self.started = time.monotonic()
        self.echo(f"[{self.number}/{self.total}] {title}")

    def done(self, text: str) -> float:
        seconds = time.monotonic() - self.started
        self.echo(f"      {text}  ({seconds:.0f} s)")
        return round(seconds, 1)


# --------------------------------------------------------------------------- measurements


def _measure(model, tokenizer, heldout, records, knowledge: bool = False) -> dict:
    """Held-out perplexity and exact-match accuracy per instruction task of a model in memory;
    with ``knowledge``, also the accuracy on the same questions phrased as the corpus phrases them."""
    from lns_surgery.demo import evaluation

    figures = {
        "heldout_perplexity": evaluation.perplexity(model, heldout),
        "exact_match": evaluation.exact_match_by_task(model, tokenizer, records),
    }
    if knowledge:
        figures["cloze_accuracy"] = evaluation.cloze_accuracy_by_task(model, tokenizer, records)
    return figures


def _depth_summary(entry: dict) -> dict:
    """A few numbers from one model's analysis entry: the curse-of-depth story in brief."""
    layers = entry["layers"]
    deep = layers[len(layers) // 2:]
    increases = [layer["removal_loss_increase"] for layer in deep if layer["removal_loss_increase"] is not None]
    least = min((layer for layer in layers if layer["removal_loss_increase"] is not None),
                key=lambda layer: layer["removal_loss_increase"], default=None)
    return {
        "perplexity": entry["perplexity"],
        "last_block_output_variance": layers[-1]["output_variance"],
        "deep_half_mean_removal_loss_increase": sum(increases) / len(increases) if increases else None,
        "deep_half_mean_angular_distance": sum(layer["angular_distance_next"] for layer in deep) / len(deep),
        "least_needed_block": least["block"] if least else None,
        "least_needed_block_loss_increase": least["removal_loss_increase"] if least else None,
    }


# The export check runs in a new interpreter in which `import lns_surgery` fails, as on a machine that
# only has transformers: the checkpoint's own code (trust_remote_code) must do everything.
_RELOAD_SCRIPT = r"""
import json, sys
sys.modules["lns_surgery"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, inputs_path, logits_path, result_path = sys.argv[1:5]
inputs = json.loads(open(inputs_path, encoding="utf-8").read())
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(input_ids=torch.tensor(inputs["input_ids"])).logits
torch.save(logits, logits_path)
tokenizer.padding_side = "left"
batch = tokenizer(inputs["prompts"], return_tensors="pt", padding=True)
with torch.no_grad():
    generated = model.generate(**batch, do_sample=False, max_new_tokens=inputs["max_new_tokens"],
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
result = {"class": type(model).__module__ + "." + type(model).__name__,
          "lns": getattr(model.config, "lns", None), "texts": texts}
open(result_path, "w", encoding="utf-8").write(json.dumps(result))
"""


def _reload_in_fresh_process(folder: Path, model, tokenizer, heldout, records, work: Path, threads: int) -> dict:
    """Load ``folder`` in a fresh interpreter (package blocked, remote code trusted) and compare its
    logits on a few held-out blocks and its greedy answers to a few prompts with ``model``'s."""
    import torch

    from lns_surgery.demo import data, evaluation

    probe = heldout[:4]
    prompts = [data.format_prompt(r) for r in records[:8]]
    max_new_tokens = 12
    folder, work = folder.resolve(), work.resolve()  # the child runs in another directory
    work.mkdir(parents=True, exist_ok=True)
    inputs_path, logits_path, result_path = work / "inputs.json", work / "logits.pt", work / "result.json"
    inputs_path.write_text(json.dumps({"input_ids": probe, "prompts": prompts, "max_new_tokens": max_new_tokens}),
                           encoding="utf-8")

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads))
    env.pop("PYTHONPATH", None)  # the package must not be importable there
    started = time.monotonic()
    process = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(folder), str(inputs_path), str(logits_path), str(result_path)],
        cwd=work, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
    )
    seconds = time.monotonic() - started
    if process.returncode != 0:
        last = (process.stderr.strip().splitlines() or ["no output"])[-1]
        raise LNSError(f"reloading the export in a fresh process failed: {last}")
    reloaded = json.loads(result_path.read_text(encoding="utf-8"))
    their_logits = torch.load(logits_path, weights_only=True)
    with torch.no_grad():
        our_logits = model.eval()(input_ids=torch.tensor(probe)).logits
    difference = (their_logits - our_logits).abs().max().item()
    ours = evaluation.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    shutil.rmtree(work)
    return {
        "loaded_class": reloaded["class"],
        "remote_code": reloaded["class"].startswith("transformers_modules."),
        "lns_alpha": (reloaded["lns"] or {}).get("alpha"),
        "max_abs_logit_difference": difference,
        "logits_match": difference <= RELOAD_ATOL,
        "greedy_answers_match": reloaded["texts"] == ours,
        "compared_tokens": len(probe) * len(probe[0]),
        "compared_prompts": len(prompts),
        "seconds": round(seconds, 1),
    }


# --------------------------------------------------------------------------- the stages


@dataclass
class _Run:
    """What every stage needs: where to write, the sizes, the shared evaluation data, the console."""

    staging: Path
    settings: DemoSettings
    base: str
    base_folder: Path
    threads: int
    console: _Console
    tokenizer: object = None
    splits: dict = field(default_factory=dict)
    heldout: list = field(default_factory=list)  # packed held-out blocks (perplexity)
    heldout_documents: list = field(default_factory=list)  # the same documents as text (analysis)
    figures: dict = field(default_factory=dict)

    @property
    def eval_records(self) -> list[dict]:
        return self.splits["eval"]

    def training_settings(self, **settings) -> dict:
        """Recipe keys every demo run shares (CPU, fp32, nothing saved but the final model), plus ``settings``."""
        return {"seed": self.settings.seed, "data_seed": self.settings.seed, "use_cpu": True, "bf16": False,
                "report_to": "none", "save_strategy": "no", "activation_checkpointing": False,
                "dataloader_num_workers": 0, "per_device_train_batch_size": self.settings.batch_size,
                "lr_scheduler_type": "cosine", "warmup_steps": max(1, settings["max_steps"] // 20),
                "logging_steps": max(1, settings["max_steps"] // 4), **settings}


def _stage_base(run: _Run) -> None:
    import lns_surgery

    run.console.begin(f"Base model: the shipped pretrained Pre-LN Llama ({run.base})")
    model = lns_surgery.load_model(str(run.base_folder))
    measured = _measure(model, run.tokenizer, run.heldout, run.eval_records, knowledge=True)
    run.figures["base"] = {
        "model": str(run.base),
        "num_layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        **measured,
    }
    run.figures["base"]["seconds"] = run.console.done(
        f"held-out perplexity {measured['heldout_perplexity']:.3f}; instruction exact match "
        f"{measured['exact_match']['all']:.1%} (asked in the corpus's own words: "
        f"{measured['cloze_accuracy']['all']:.1%})")


def _stage_convert(run: _Run) -> Path:
    import lns_surgery

    run.console.begin("Convert: LayerNorm Scaling, code mode (lns_surgery.convert)")
    folder = lns_surgery.convert(str(run.base_folder), run.staging / "converted")
    model = lns_surgery.load_model(str(folder))
    measured = _measure(model, run.tokenizer, run.heldout, run.eval_records, knowledge=True)
    base_ppl, ppl = run.figures["base"]["heldout_perplexity"], measured["heldout_perplexity"]
    run.figures["convert"] = {
        "checkpoint": "converted",
        "lns_alpha": lns_status(model.config).alpha,
        **measured,
        "perplexity_change": ppl - base_ppl,
        "perplexity_relative_change": _relative_change(ppl, base_ppl),
    }
    run.figures["convert"]["seconds"] = run.console.done(
        f"held-out perplexity {base_ppl:.3f} -> {ppl:.3f} ({_relative_change(ppl, base_ppl):+.1%}) "
        "from the scaling alone")
    return folder


def _stage_heal(run: _Run, converted: Path) -> Path:
    """Continued pre-training on the demo corpus, the scaling ramped from 0 to full strength."""
    import transformers

    from lns_surgery.demo import data
    from lns_surgery.training import train_from_dict

    settings = run.settings
    run.console.begin(f"Heal: {settings.heal_steps} steps of continued pre-training, LNS ramped in over the first "
                      f"{settings.heal_ramp_steps}")
    corpus = run.staging / "data" / "heal_corpus.jsonl"
    _write_jsonl(corpus, ({"text": text} for text in
                          data.pretraining_corpus(settings.heal_documents, seed=data.TRAIN_CORPUS_SEED)))
    transformers.set_seed(settings.seed)
    result = train_from_dict(run.training_settings(
        model_name_or_path=str(converted),
        lns_ramp_steps=settings.heal_ramp_steps,  # starts from alpha 0: the base's own function
        dataset_name=str(corpus),
        dataset_format="text",
        packing=True,
        max_length=data.BLOCK_SIZE,
        output_dir=str(run.staging / "healed"),
        max_steps=settings.heal_steps,
        learning_rate=settings.heal_learning_rate,
        weight_decay=0.0,
    ), command="pretrain")
    measured = _measure(result.model, result.tokenizer, run.heldout, run.eval_records, knowledge=True)
    base_ppl = run.figures["base"]["heldout_perplexity"]
    converted_ppl, ppl = run.figures["convert"]["heldout_perplexity"], measured["heldout_perplexity"]
    gap = converted_ppl - base_ppl
    run.figures["heal"] = {
        "checkpoint": "healed",
        "steps": settings.heal_steps,
        "ramp_steps": settings.heal_ramp_steps,
        "learning_rate": settings.heal_learning_rate,
        "tokens_seen": result.metrics["train"].get("tokens_seen"),
        "train_loss": result.metrics["train"].get("train_loss"),
        "lns_alpha": lns_status(result.model.config).alpha,
        **measured,
        "perplexity_change_vs_converted": ppl - converted_ppl,
        "perplexity_relative_change_vs_base": _relative_change(ppl, base_ppl),
        # 1.0: back at the base's perplexity; above 1.0: below it
        "recovered_fraction": (converted_ppl - ppl) / gap if gap > 0 else None,
    }
    run.figures["heal"]["seconds"] = run.console.done(
        f"held-out perplexity {converted_ppl:.3f} -> {ppl:.3f} (base {base_ppl:.3f}); "
        f"LNS alpha now {run.figures['heal']['lns_alpha']:g}")
    return result.output_dir


def _stage_sft(run: _Run, healed: Path):
    """LoRA on the instruction task's training split, in the prompt format the evaluation uses."""
    import transformers

    from lns_surgery.demo import data
    from lns_surgery.training import train_from_dict

    settings = run.settings
    run.console.begin(f"SFT: LoRA (r={settings.lora_r}) on the instruction task, {settings.sft_steps} steps")
    records = run.staging / "data" / "sft_train.jsonl"
    _write_jsonl(records, (data.to_prompt_completion(record) for record in run.splits["train"]))
    transformers.set_seed(settings.seed)
    result = train_from_dict(run.training_settings(
        model_name_or_path=str(healed),
        dataset_name=str(records),
        dataset_format="prompt_completion",  # loss on the answer (and EOS) only
        max_length=data.BLOCK_SIZE,
        use_peft=True,
        lora_r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        lora_target_modules=["all-linear"],
        export="both",  # sft/ is the merged standalone model, sft/adapter/ the LoRA adapter
        output_dir=str(run.staging / "sft"),
        max_steps=settings.sft_steps,
        learning_rate=settings.sft_learning_rate,
    ), command="sft")
    before = run.figures["heal"]["exact_match"]
    measured = _measure(result.model, result.tokenizer, run.heldout, run.eval_records)
    run.figures["sft"] = {
        "checkpoint": "sft",
        "adapter": "sft/adapter",
        "steps": settings.sft_steps,
        "train_records": len(run.splits["train"]),
        "eval_records": len(run.eval_records),
        "lora_r": settings.lora_r,
        "learning_rate": settings.sft_learning_rate,
        "train_loss": result.metrics["train"].get("train_loss"),
        "exact_match_before": before,
        **measured,
    }
    run.figures["sft"]["seconds"] = run.console.done(
        f"exact match {before['all']:.1%} -> {measured['exact_match']['all']:.1%} on {len(run.eval_records)} "
        "held-out instructions")
    return result


def _stage_analyze(run: _Run, folders: dict[str, Path]) -> None:
    from lns_surgery.analysis import analyze
    from lns_surgery.demo import data

    run.console.begin("Analyze: variance, angular distance and layer removal, before and after")
    report = analyze(
        [str(folder) for folder in folders.values()], run.heldout_documents, run.staging / "analysis",
        names=list(folders), seq_len=data.BLOCK_SIZE, max_tokens=run.settings.analysis_tokens, batch_size=16,
        device="cpu", progress=True,
    )
    plots = sorted(f"analysis/{path.name}" for path in (run.staging / "analysis").glob("*.png"))
    depth = {entry["name"]: _depth_summary(entry) for entry in report["models"]}
    run.figures["analyze"] = {
        "report": "analysis/report.json",
        "summary": "analysis/summary.md",
        "plots": plots,
        "tokens_per_model": report["models"][0]["tokens"],
        "models": depth,
    }
    run.figures["analyze"]["seconds"] = run.console.done("last-block output variance " + ", ".join(
        f"{name} {figures['last_block_output_variance']:.3g}" for name, figures in depth.items()))


def _stage_export(run: _Run, tuned) -> None:
    run.console.begin("Export: reload the fine-tuned checkpoint in a fresh process (trust_remote_code)")
    check = _reload_in_fresh_process(tuned.output_dir, tuned.model, tuned.tokenizer, run.heldout, run.eval_records,
                                     run.staging / ".reload-check", run.threads)
    run.figures["export"] = {"checkpoint": "sft", **check}
    verdict = "match" if check["logits_match"] and check["greedy_answers_match"] else "DO NOT MATCH"
    run.figures["export"]["seconds"] = run.console.done(
        f"{check['loaded_class'].rsplit('.', 1)[-1]} from the checkpoint's own code: logits and greedy answers "
        f"{verdict} (largest logit difference {check['max_abs_logit_difference']:.1e})")


# --------------------------------------------------------------------------- the demo


def _base_folder(base: str) -> Path:
    from lns_surgery.core.sources import resolve_builtin

    folder = Path(resolve_builtin(str(base)))
    if not (folder / "config.json").is_file():
        raise LNSError(f"'{base}' is not a model folder (no config.json); the demo needs the built-in base "
                       "or a folder written by scripts/train_demo_base.py")
    return folder


def run_demo(
    out: str | os.PathLike = DEFAULT_OUT,
    *,
    steps_scale: float = 1.0,
    quick: bool = False,
    overwrite: bool = False,
    base: str = DEFAULT_BASE,
    threads: int = 1,
    settings: DemoSettings | None = None,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the six stages (see the module docstring) and write everything to ``out``.

    ``quick`` uses smaller runs and evaluation sets (the CI test's setting); ``steps_scale``
    multiplies the optimizer steps of healing and fine-tuning on top. ``base`` is the Pre-LN model to
    start from: the shipped ``builtin:demo`` or a folder written by ``scripts/train_demo_base.py``.
    ``threads`` is torch's CPU thread count. The model is so small that extra threads gain little,
    and on a busy machine they lose a lot: they spin waiting for each other's cores.
    """
    out = Path(out)
    outputs.check_output(out, overwrite, [base])  # before anything slow is imported
    if threads < 1:
        raise LNSError(f"threads must be at least 1, got {threads}")
    settings = (settings or (QUICK if quick else DemoSettings())).scaled(steps_scale)
    base_folder = _base_folder(base)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import lns_surgery
    from lns_surgery.demo import data

    begun = time.monotonic()
    with _quiet_libraries(threads), outputs.atomic_output_dir(out, overwrite, [base_folder]) as staging:
        run = _Run(staging=staging, settings=settings, base=base, base_folder=base_folder, threads=threads,
                   console=_Console(echo, total=6))
        run.tokenizer = lns_surgery.load_tokenizer(str(base_folder))
        run.splits = data.instruction_splits()
        run.heldout = data.heldout_blocks(run.tokenizer, settings.heldout_documents)
        run.heldout_documents = data.pretraining_corpus(settings.heldout_documents, seed=data.HELDOUT_CORPUS_SEED)

        _stage_base(run)
        converted = _stage_convert(run)
        healed = _stage_heal(run, converted)
        tuned = _stage_sft(run, healed)
        _stage_analyze(run, {"base": base_folder, "converted": converted, "healed": healed, "sft": tuned.output_dir})
        _stage_export(run, tuned)

        wall = round(time.monotonic() - begun, 1)
        summary = json_safe({
            "schema_version": 1,
            "tool_version": lns_surgery.__version__,
            "base_model": str(base),
            "settings": dataclasses.asdict(settings),
            "steps_scale": steps_scale,
            "quick": quick,
            "threads": threads,
            "wall_seconds": wall,
            "artefacts": {
                "converted_checkpoint": "converted",
                "healed_checkpoint": "healed",
                "sft_checkpoint": "sft",
                "sft_adapter": "sft/adapter",
                "analysis_report": "analysis/report.json",
                "analysis_plots": run.figures["analyze"]["plots"],
                "heal_corpus": "data/heal_corpus.jsonl",
                "sft_data": "data/sft_train.jsonl",
                "summary_markdown": "summary.md",
            },
            "stages": run.figures,
            "findings": findings(run.figures),
        })
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (staging / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")

    echo("")
    echo(summary_table(summary))
    echo("")
    for line in summary["findings"]:
        echo(f"- {line}")
    echo(f"\nwrote {out}/ in {wall:.0f} s: summary.md, summary.json, converted/, healed/, sft/, analysis/")
    return DemoResult(out=out, stages=summary["stages"], settings=settings, wall_seconds=wall, summary=summary)


# --------------------------------------------------------------------------- reporting


def findings(stages: dict) -> list[str]:
    """What happened, in plain words, from the figures (each sentence is chosen by the numbers)."""
    base, convert, heal, sft = stages["base"], stages["convert"], stages["heal"], stages["sft"]
    base_ppl, conv_ppl, heal_ppl = base["heldout_perplexity"], convert["heldout_perplexity"], heal["heldout_perplexity"]
    lines = [f"The surgery alone {_moved(conv_ppl, base_ppl)} held-out perplexity from {base_ppl:.3f} to "
             f"{conv_ppl:.3f} ({convert['perplexity_relative_change']:+.1%}): the pretrained weights were tuned for "
             "unscaled norms."]
    healing = f"Healing ({heal['steps']} steps of continued pre-training, LNS ramped in over {heal['ramp_steps']})"
    control = ("Whether the LNS model ends up ahead of the base trained on for the same steps is what "
               "scripts/healing_study.py measures; the demo does not run that control.")
    recovered = heal["recovered_fraction"]
    if heal_ppl <= base_ppl:
        lines.append(f"{healing} brought it to {heal_ppl:.3f}, at or below the base's {base_ppl:.3f}. Part of that can "
                     f"be the extra training itself, not LNS. {control}")
    elif recovered is not None and recovered > 0:
        lines.append(f"{healing} recovered {recovered:.1%} of the gap ({conv_ppl:.3f} -> {heal_ppl:.3f}) but not all "
                     f"of it: {heal['perplexity_relative_change_vs_base']:+.1%} above the base's {base_ppl:.3f}. "
                     f"{control}")
    else:
        lines.append(f"{healing} did not recover: perplexity {heal_ppl:.3f} (converted {conv_ppl:.3f}, "
                     f"base {base_ppl:.3f}).")

    em_before, em_after = sft["exact_match_before"]["all"], sft["exact_match"]["all"]
    if em_after - em_before >= 0.05:
        lines.append(f"LoRA fine-tuning ({sft['steps']} steps) raised exact-match accuracy on {sft['eval_records']} "
                     f"held-out instructions from {em_before:.1%} to {em_after:.1%}.")
    else:
        lines.append(f"LoRA fine-tuning ({sft['steps']} steps) barely moved exact-match accuracy on "
                     f"{sft['eval_records']} held-out instructions ({em_before:.1%} -> {em_after:.1%}).")
    knows = heal.get("cloze_accuracy", {}).get("all")
    if knows is not None:
        lines.append(f"For scale: asked the same questions the way its corpus phrases them, the healed model answers "
                     f"{knows:.1%} (the base {base['cloze_accuracy']['all']:.1%}). Fine-tuning teaches the instruction "
                     "format; it adds little knowledge, and a model this small gets many values wrong.")
    if sft["heldout_perplexity"] > 1.1 * heal_ppl:
        lines.append(f"Fine-tuning on instruction records alone {_moved(sft['heldout_perplexity'], heal_ppl)} "
                     f"held-out corpus perplexity from {heal_ppl:.3f} to {sft['heldout_perplexity']:.3f}: the LoRA "
                     "update serves the instruction format at the cost of plain text.")

    depth = stages["analyze"]["models"]
    if "base" in depth and "healed" in depth:
        b, h = depth["base"], depth["healed"]
        lines.append(f"Depth (analysis/): the last block's output variance "
                     f"{_moved(h['last_block_output_variance'], b['last_block_output_variance'], transitive=False)} "
                     f"from {b['last_block_output_variance']:.3g} (base) to {h['last_block_output_variance']:.3g} "
                     f"(healed); removing one block of the deep half costs "
                     f"{_nats(b['deep_half_mean_removal_loss_increase'])} in the base and "
                     f"{_nats(h['deep_half_mean_removal_loss_increase'])} after healing, on average.")
    export = stages["export"]
    if export["logits_match"] and export["greedy_answers_match"]:
        lines.append(f"The fine-tuned export reloads in a fresh process that cannot import lns_surgery "
                     f"({export['loaded_class'].rsplit('.', 1)[-1]} from the checkpoint's own code) with the same "
                     f"logits (largest difference {export['max_abs_logit_difference']:.1e}) and the same answers.")
    else:
        lines.append(f"The reloaded export does NOT match the model in memory (largest logit difference "
                     f"{export['max_abs_logit_difference']:.2e}; same answers: {export['greedy_answers_match']}).")
    return lines


def _moved(new: float, old: float, transitive: bool = True) -> str:
    if transitive:
        return "raised" if new > old else "lowered" if new < old else "left"
    return "rose" if new > old else "fell" if new < old else "stayed"


def _nats(value) -> str:
    return "n/a" if value is None else f"{value:+.3f} nats"


def _table_rows(summary: dict) -> list[tuple[str, ...]]:
    stages = summary["stages"]
    rows = [("stage", "model", "held-out ppl", "exact match", "notes")]
    rows.append(("1 base", "builtin Pre-LN", f"{stages['base']['heldout_perplexity']:.3f}",
                 f"{stages['base']['exact_match']['all']:.1%}",
                 f"{stages['base']['num_layers']} layers, {stages['base']['parameters'] / 1e6:.2f}M parameters"))
    rows.append(("2 convert", "converted/", f"{stages['convert']['heldout_perplexity']:.3f}",
                 f"{stages['convert']['exact_match']['all']:.1%}",
                 f"{stages['convert']['perplexity_relative_change']:+.1%} perplexity from the surgery"))
    heal = stages["heal"]
    recovered = "" if heal["recovered_fraction"] is None else f", {heal['recovered_fraction']:.1%} of the gap recovered"
    rows.append(("3 heal", "healed/", f"{heal['heldout_perplexity']:.3f}", f"{heal['exact_match']['all']:.1%}",
                 f"{heal['steps']} steps, ramp {heal['ramp_steps']}{recovered}"))
    sft = stages["sft"]
    rows.append(("4 sft", "sft/", f"{sft['heldout_perplexity']:.3f}", f"{sft['exact_match']['all']:.1%}",
                 f"LoRA r={sft['lora_r']}, {sft['steps']} steps (before: {sft['exact_match_before']['all']:.1%})"))
    analysis = stages["analyze"]
    rows.append(("5 analyze", "analysis/", "", "", f"report.json + {len(analysis['plots'])} plots"))
    export = stages["export"]
    ok = "match" if export["logits_match"] and export["greedy_answers_match"] else "MISMATCH"
    rows.append(("6 export", "sft/", "", "", f"fresh process, trust_remote_code: {ok} "
                                              f"(largest logit difference {export['max_abs_logit_difference']:.1e})"))
    return rows


def summary_table(summary: dict) -> str:
    """The summary as a plain-text table (what the command prints at the end)."""
    rows = _table_rows(summary)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    """summary.md: the table, what happened, per-task accuracy, the depth figures, the artefacts."""
    stages = summary["stages"]
    rows = _table_rows(summary)
    lines = ["# lns-surgery demo", "",
             f"Base model `{summary['base_model']}`; {summary['wall_seconds']:.0f} s"
             + (" (quick run)" if summary["quick"] else "") + f"; lns-surgery {summary['tool_version']}.", "",
             *table(rows[0], rows[1:])]
    lines += ["", "## What happened", ""] + [f"- {line}" for line in summary["findings"]]

    tasks = sorted(task for task in stages["sft"]["exact_match"] if task != "all") + ["all"]
    rows = []
    for task in tasks:
        cells = [stages[s]["exact_match"].get(task) for s in ("base", "convert", "heal", "sft")]
        cells.append(stages["base"].get("cloze_accuracy", {}).get(task))
        rows.append([task] + ["" if c is None else f"{c:.0%}" for c in cells])
    lines += ["", "## Exact match per task (instruction evaluation split)", "",
              *table(["task", "base", "converted", "healed", "after SFT", "base, asked in corpus words"], rows)]

    rows = []
    for name, depth in stages["analyze"]["models"].items():
        removal = depth["deep_half_mean_removal_loss_increase"]
        rows.append([name, f"{depth['perplexity']:.3f}", f"{depth['last_block_output_variance']:.3g}",
                     "" if removal is None else f"{removal:+.3f}", f"{depth['deep_half_mean_angular_distance']:.3f}",
                     str(depth["least_needed_block"])])
    lines += ["", "## Depth diagnostics (analysis/)", "",
              f"Measured on {stages['analyze']['tokens_per_model']} held-out tokens per model (its own windows, so "
              "the perplexity differs a little from the table above).", "",
              *table(["model", "perplexity", "last-block output variance", "deep-half removal cost (nats)",
                      "deep-half angular distance", "least needed block"], rows)]
    lines += [""] + [f"![{Path(plot).stem}]({plot})" for plot in stages["analyze"]["plots"]]

    lines += ["", "## Artefacts", ""]
    lines += [f"- {name.replace('_', ' ')}: `{path}`" for name, path in summary["artefacts"].items()
              if isinstance(path, str)]
    lines += ["", "Load any checkpoint here with "
              "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.", ""]
    return "\n".join(lines)
