#!/usr/bin/env python
"""Healing study: does LayerNorm Scaling pay off on *this* pretrained model, and does healing keep it?

    python scripts/healing_study.py --model ../shared/models/stories260K \\
        --data ../shared/data/c4-sample/c4_sample300.jsonl --steps 60 --seeds 0,1,2 --threads 1 --cpu \\
        --out out/healing-study

On a pretrained model LNS is a reparametrisation: norm weights that learn ``w -> sqrt(l) * w`` give back
exactly the stock function. So "LNS, healed" may be the stock model with extra steps. The study trains
one stock (Pre-LN) checkpoint in several arms, on the same tokens in the same order with the same
learning-rate schedule and held-out split, and measures both what each arm reaches and whether the
scaling survived:

- ``stock``: the base model trained on as it is (no LNS), the baseline any surgery has to beat;
- ``lns-lm``: converted to LNS on load (every block's pre-norm outputs times 1/sqrt(l) from the first
  step), language-modelling loss, norms trained;
- ``lns-lm-frozen``: the same with the scaled norms frozen (``heal_norms: freeze``): the scaling cannot
  be undone;
- ``lns-distill``: converted, healed by distillation from the source model (``distill: true``,
  KL(source || model) per token), norms trained;
- ``lns-distill-frozen``: distillation with the scaled norms frozen;
- ``lns-ramp``: converted at alpha 0 (the original function) and ramped linearly to full LNS over the
  first ``--ramp-steps`` optimizer steps, language-modelling loss, norms trained.

``--arms`` picks a subset; ``--seeds 0,1,2`` runs every arm once per seed. A seed sets the order of the
training windows (the same order for every arm of that seed); the held-out split stays the one of
``--split-seed``, so every run is evaluated on the same records.

Each run is evaluated on the held-out split before training and every ``--eval-every`` steps (for the
distillation arms the held-out perplexity is the exponential of the language-modelling loss the trainer
logs beside the KL term). The untouched base, the converted model and every final model then get the
depth diagnostics of ``lns-surgery analyze`` on the same held-out windows, and the LNS models the
effective scales of their norms against the base checkpoint (``||c_l * w_l|| / ||w_l(base)||``: the
nominal scale c_l while the surgery holds, 1 where training has undone it).

Per arm, over the seeds (mean and min-max): the held-out perplexity curve; the tokens it took to
recover 90% and 99% of the perplexity jump the conversion caused (from the converted model's step-0
perplexity back towards the base's; the ramp arm counts from the step it reaches full LNS); the final
perplexity against the stock arm of the same seed (equal tokens); the middle third of the blocks'
mean removal drop and the last block's output variance; and the effective scales (mean over the
scaled blocks 2..L of effective / nominal per norm, 1 = scaling kept, sqrt(l) = fully undone; the
fraction of scaled blocks whose effective scale is back above 0.9, 'undone').

Writes into ``--out`` (which appears only once everything is written):

- ``results.json``: settings, every run's curve and depth numbers, the per-arm aggregates and the verdict;
- ``summary.md``: the verdict in plain words and the tables;
- ``eval_perplexity.png``: held-out perplexity against tokens, one line per arm (mean over seeds) with
  a min-max band;
- ``effective_scales.png``: effective LNS scale per block for every LNS arm (mean over seeds);
- ``depth/``: the full depth report of the base, the converted model and each arm's first-seed model;
- ``runs/<arm>/seed-<seed>/``: each run's ``metrics.json`` and ``recipe.yaml`` (with ``--keep-models``,
  also the trained model).

Models: any stock checkpoint folder, ``builtin:demo`` (the package's demo base; train it on its own
corpus, see docs/studies.md), or a Hub id. ``--prepare-smollm2 DIR`` writes SmolLM2-135M-Instruct from the
shared GGUF file as an ordinary safetensors folder in DIR (reused when already there) for ``--model``.

GPU preset (documented, not run here): Qwen2.5-0.5B (24 blocks) from the Hub, ~400M tokens per run,
all six arms, three seeds. A held-out fraction needs a local file: write the first ~1M documents of
C4 (``allenai/c4``, ``en``, train; ~2 GB of text) to ``c4-en-1M.jsonl`` first. Then, on one GPU:

    python scripts/healing_study.py --model Qwen/Qwen2.5-0.5B --data c4-en-1M.jsonl --eval-fraction 0.002 \\
        --seeds 0,1,2 --steps 6000 --batch-size 64 --seq-len 1024 --lr 3e-4 --warmup-steps 300 \\
        --ramp-steps 1000 --eval-every 250 --analysis-tokens 65536 --out out/healing-qwen2.5-0.5b

6000 x 64 x 1024 = 393M tokens per run (a batch of 64 x 1024 may need a GPU with 80 GB; the script
has no gradient accumulation option). Cost, estimated and not measured: a few hours per run on one
H100-class GPU, the distillation arms about a third more (a second, gradient-free forward), so the
18 runs take days; ``--arms stock,lns-lm,lns-distill --seeds 0`` is the cheap first look. A
SmolLM2-135M folder (``--prepare-smollm2``) with ``--lr 1e-3`` is the smaller variant. Differences
smaller than the seed spread are not results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lns_surgery.analysis.plots import log_axis
from lns_surgery.core.reports import json_safe


# Each arm: what it is, and the recipe keys that set it apart (everything else is shared).
ARMS = {
    "stock": ("base model trained on as it is (no LNS)", {}),
    "lns-lm": ("LNS from the first step, LM loss, norms trained", {"lns_convert": True}),
    "lns-lm-frozen": ("LNS from the first step, LM loss, scaled norms frozen",
                      {"lns_convert": True, "heal_norms": "freeze"}),
    "lns-distill": ("LNS from the first step, distillation from the source, norms trained",
                    {"lns_convert": True, "distill": True}),
    "lns-distill-frozen": ("LNS from the first step, distillation from the source, scaled norms frozen",
                           {"lns_convert": True, "distill": True, "heal_norms": "freeze"}),
    "lns-ramp": ("LNS ramped in from alpha 0 over the ramp steps, LM loss, norms trained", {"lns_convert": True}),
}
RECOVERY_LEVELS = (0.9, 0.99)
UNDONE_ABOVE = 0.9  # an effective scale back above this counts as undone (the nominal scales are <= 0.71)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", help="stock (Pre-LN) checkpoint: a folder, builtin:demo or a Hub id")
    parser.add_argument("--data", help="training text: a local .jsonl/.json/.txt/.parquet file or a Hub dataset")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (the same token budget for each)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated arms to run, from {', '.join(ARMS)} (default: all)")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds of the training-data order; every arm runs once per seed (default: %(default)s)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split, the same for every run (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("out/healing-study"), help="output folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--ramp-steps", type=int, default=None,
                        help="steps of the lns-ramp arm's ramp (default: a quarter of --steps)")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: a tenth of --steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine schedule (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of --steps)")
    parser.add_argument("--distill-temperature", type=float, default=1.0,
                        help="softmax temperature of the distillation arms' KL term (default: %(default)s)")
    parser.add_argument("--distill-weight", type=float, default=1.0,
                        help="distillation arms: loss = w * KL + (1 - w) * LM (default: %(default)s)")
    parser.add_argument("--eval-fraction", type=float, default=0.1,
                        help="held-out fraction of --data's records (default: %(default)s)")
    parser.add_argument("--text-field", default="text", help="record field holding the text (default: %(default)s)")
    parser.add_argument("--analysis-tokens", type=int, default=16384,
                        help="held-out tokens for the depth diagnostics (default: %(default)s)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; on a busy machine 1 is often fastest)")
    parser.add_argument("--keep-models", action="store_true", help="keep each run's trained model under runs/<arm>/seed-<seed>/")
    parser.add_argument("--prepare-smollm2", type=Path, metavar="DIR",
                        help="write SmolLM2-135M-Instruct from the shared GGUF file as a safetensors folder DIR (kept and "
                             "reused), then run the study on it if --data and --steps are given")
    return parser.parse_args(argv)


# --- settings and recipes -----------------------------------------------------------------------


def _int_list(text: str, option: str) -> list[int]:
    from lns_surgery.core.errors import LNSError

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LNSError(f"{option} takes comma-separated integers, got '{text}'") from None
    if not values or len(set(values)) != len(values):
        raise LNSError(f"{option} needs at least one value and no repeats, got '{text}'")
    return values


def study_settings(args) -> dict:
    """The settings every run shares, with the defaults that depend on --steps resolved."""
    from lns_surgery.core.errors import LNSError

    if args.model is None or args.data is None or args.steps is None:
        raise LNSError("--model, --data and --steps are required (only --prepare-smollm2 runs without them)")
    if args.steps < 1:
        raise LNSError("--steps must be at least 1")
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms or len(set(arms)) != len(arms):
        raise LNSError(f"--arms takes distinct names from {', '.join(ARMS)}; got '{args.arms}'")
    arms = [arm for arm in ARMS if arm in arms]  # always in the same order
    seeds = _int_list(args.seeds, "--seeds")
    ramp = args.ramp_steps if args.ramp_steps is not None else max(1, args.steps // 4)
    if not 1 <= ramp <= args.steps:
        raise LNSError(f"--ramp-steps must be between 1 and --steps ({args.steps}), so that the ramp arm ends at full LNS")
    eval_every = args.eval_every or max(1, args.steps // 10)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    if not 0.0 < args.eval_fraction < 1.0:
        raise LNSError("--eval-fraction must be between 0 and 1")
    return {"model": args.model, "data": args.data, "steps": args.steps, "arms": arms, "seeds": seeds,
            "split_seed": args.split_seed, "ramp_steps": ramp, "eval_every": eval_every, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "learning_rate": args.lr, "lr_schedule": "cosine", "warmup_steps": warmup,
            "distill_temperature": args.distill_temperature, "distill_weight": args.distill_weight,
            "eval_fraction": args.eval_fraction, "text_field": args.text_field, "analysis_tokens": args.analysis_tokens,
            "cpu": bool(args.cpu), "threads": args.threads}


def recipe_for(arm: str, settings: dict, output_dir: Path, seed: int) -> dict:
    """The training recipe (``lns-surgery pretrain`` keys) of one run; only the LNS and loss keys differ
    between arms, and only the data order between seeds."""
    recipe = {
        "model_name_or_path": settings["model"],
        "dataset_name": settings["data"],
        "dataset_format": "text",
        "dataset_text_field": settings["text_field"],
        "eval_fraction": settings["eval_fraction"],
        "max_length": settings["seq_len"],
        "packing": True,
        # "wrapped": documents joined with EOS and cut into rows of [batch, max_length], every token used.
        # TRL's default "bfd" truncates long documents and flattens the batch into one padding-free row,
        # whose attention costs (batch x max_length)^2 without FlashAttention: ~8x slower on a CPU.
        "packing_strategy": "wrapped",
        "max_steps": settings["steps"],
        "per_device_train_batch_size": settings["batch_size"],
        # One row per evaluation batch: the Trainer's eval_loss weights batches by their rows, the LM loss a
        # distillation run logs beside its KL does not; with one row each they are the same average, and a
        # short last batch cannot tilt one arm's perplexity against another's.
        "per_device_eval_batch_size": 1,
        "learning_rate": settings["learning_rate"],
        "lr_scheduler_type": settings["lr_schedule"],
        "warmup_steps": settings["warmup_steps"],
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "eval_strategy": "steps",
        "eval_steps": settings["eval_every"],
        "eval_on_start": True,  # step 0: the base (stock, ramp at alpha 0) or the freshly converted model
        "logging_steps": settings["eval_every"],
        "save_strategy": "no",
        "report_to": "none",
        "activation_checkpointing": False,
        # `seed` also draws the held-out split (load_datasets): fixed, so every run is evaluated on the
        # same records; `data_seed` orders the training windows.
        "seed": settings["split_seed"],
        "data_seed": seed,
        "use_cpu": settings["cpu"],
        "output_dir": str(output_dir),
        "overwrite": True,
    }
    recipe.update(ARMS[arm][1])
    if arm == "lns-ramp":
        recipe["lns_ramp_steps"] = settings["ramp_steps"]
    if recipe.get("distill"):
        recipe.update(distill_temperature=settings["distill_temperature"], distill_weight=settings["distill_weight"])
    return recipe


# --- one run --------------------------------------------------------------------------------------


def eval_curve(log_history: list[dict], arm: str, ramp_steps: int, tokens_per_step: int) -> list[dict]:
    """(step, tokens, held-out LM loss and perplexity, LNS alpha the model computed with) per evaluation."""
    from lns_surgery.training.callbacks import ramp_alpha

    # A distillation run's eval_loss is its training objective (the KL term); its LM loss is logged beside it.
    key = "eval_lm_loss" if ARMS[arm][1].get("distill") else "eval_loss"
    by_step = {}
    for entry in log_history:
        if key in entry:  # the final evaluation repeats the last step's: keep one
            by_step[int(entry["step"])] = float(entry[key])
    curve = []
    for step, loss in sorted(by_step.items()):
        alpha = None if arm == "stock" else ramp_alpha(step, ramp_steps) if arm == "lns-ramp" else 1.0
        curve.append({"step": step, "tokens": step * tokens_per_step, "eval_loss": loss, "eval_perplexity": _exp(loss),
                      "lns_alpha": alpha})
    return curve


def _exp(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def held_out_texts(recipe: dict) -> list[str]:
    """The evaluation split the runs use (the training stage's own split, same seed), as texts."""
    from lns_surgery.training import data
    from lns_surgery.training.recipe import recipe_from_dict

    parsed = recipe_from_dict(recipe, "pretrain")
    _, evaluation = data.load_datasets(parsed.args, seed=parsed.training.seed)
    field = parsed.training.dataset_text_field
    return [text for text in evaluation[field] if isinstance(text, str) and text.strip()]


def middle_blocks(count: int) -> range:
    """The middle third of ``count`` blocks (0-based), at least one block."""
    start, stop = count // 3, max(count // 3 + 1, (2 * count) // 3)
    return range(start, stop)


def depth_entry(report_entry: dict) -> dict:
    """The per-block numbers of an analysis report entry that the study compares, and their summaries."""
    layers = report_entry["layers"]
    removal = [layer["removal_loss_increase"] for layer in layers]
    middle = [removal[index] for index in middle_blocks(len(layers)) if removal[index] is not None]
    entry = {
        "perplexity": report_entry["perplexity"],
        "status": report_entry["status"],
        "lns_alpha": report_entry["lns_alpha"],
        "output_variance": [layer["output_variance"] for layer in layers],
        "angular_distance_next": [layer["angular_distance_next"] for layer in layers],
        "removal_loss_increase": removal,
        "middle_removal_loss_increase": statistics.fmean(middle) if middle else None,
        "last_output_variance": layers[-1]["output_variance"],
        "effective_scales": None,
    }
    if report_entry.get("effective_scales_source"):
        entry["effective_scales"] = effective_summary(layers)
    return entry


def effective_summary(layers: list[dict]) -> dict:
    """Effective LNS scales of one model: per block and norm, and over the scaled blocks 2..L (block 1's
    nominal scale is 1: there is nothing to undo) the mean of effective / nominal and the fraction undone."""
    norms = list(layers[0]["effective_scale"])
    nominal = [layer["lns_scale"] for layer in layers]
    per_block = {norm: [layer["effective_scale"][norm] for layer in layers] for norm in norms}
    scaled = [index for index, scale in enumerate(nominal) if scale < 1.0]
    summary = {"nominal": nominal, "per_block": per_block, "ratio_mean": {}, "undone_fraction": {}, "undone_share": {}}
    for norm in norms:
        values = [(per_block[norm][index], nominal[index]) for index in scaled if per_block[norm][index] is not None]
        if not values:
            summary["ratio_mean"][norm] = summary["undone_fraction"][norm] = summary["undone_share"][norm] = None
            continue
        summary["ratio_mean"][norm] = statistics.fmean(effective / scale for effective, scale in values)
        summary["undone_fraction"][norm] = sum(effective > UNDONE_ABOVE for effective, _ in values) / len(values)
        # 0: the nominal scale kept, 1: back at the source's own norm (the scaling fully undone)
        summary["undone_share"][norm] = statistics.fmean((effective - scale) / (1.0 - scale) for effective, scale in values)
    return summary


def recovery_tokens(curve: list[dict], base_ppl: float | None, converted_ppl: float | None) -> dict:
    """Tokens until held-out perplexity first came back by each RECOVERY_LEVELS share of the conversion's
    jump (converted - base), counted at full LNS only (a ramp's early steps still compute the base)."""
    result = {}
    for level in RECOVERY_LEVELS:
        key = f"{round(level * 100)}%"
        if base_ppl is None or converted_ppl is None or not converted_ppl > base_ppl:
            result[key] = None
            continue
        target = converted_ppl - level * (converted_ppl - base_ppl)
        reached = next((point["tokens"] for point in curve
                        if point["lns_alpha"] == 1.0 and point["eval_perplexity"] <= target), None)
        result[key] = reached if reached is not None else "not reached"
    return result


def resolve_source_folder(model: str) -> str:
    """The local folder of the base checkpoint, for the effective scales (a Hub id: its cached snapshot)."""
    if str(model).startswith("builtin:"):
        from lns_surgery.core.sources import builtin_path

        return str(builtin_path(str(model)[len("builtin:"):]))
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    from huggingface_hub import snapshot_download

    # load_model has just fetched it: the cache answers without the network
    return snapshot_download(model, local_files_only=True)


# --- the study ------------------------------------------------------------------------------------


def run_study(settings: dict, out: Path, *, overwrite: bool = False, keep_models: bool = False) -> dict:
    """Train every arm for every seed, analyse them and write the study folder ``out``; returns results.json's content."""
    import gc

    import torch

    from lns_surgery import apply_layernorm_scaling, is_lns_model, load_model, load_tokenizer
    from lns_surgery.analysis import analyze_model, token_windows
    from lns_surgery.analysis.report import build_report, write_outputs
    from lns_surgery.core.errors import LNSError
    from lns_surgery.core.outputs import atomic_output_dir, check_output
    from lns_surgery.training.run import train_from_dict

    check_output(out, overwrite)
    started = time.time()
    tokens_per_step = settings["batch_size"] * settings["seq_len"]
    tokenizer = load_tokenizer(settings["model"])
    base = load_model(settings["model"], dtype=torch.float32)
    if is_lns_model(base) or getattr(base.config, "lns_folded", None):
        raise LNSError(f"'{settings['model']}' already has LayerNorm Scaling; the study starts from a stock (Pre-LN) model")
    source = resolve_source_folder(settings["model"])
    if torch.cuda.is_available() and not settings["cpu"]:  # the trained arms are analysed where they trained
        base.to("cuda")
    texts = held_out_texts(recipe_for("stock", settings, out, settings["seeds"][0]))
    windows = token_windows(tokenizer, texts, settings["seq_len"], settings["analysis_tokens"])
    print(f"held-out split: {len(texts)} records; depth diagnostics on {windows.shape[0]} windows of {windows.shape[1]} tokens",
          flush=True)
    reports = [analyze_model(base, windows, name="base (untouched)")]
    apply_layernorm_scaling(base, alpha=1.0)
    reports.append(analyze_model(base, windows, name="converted (step 0)", source=source))
    del base
    depth = {entry["name"]: depth_entry(entry) for entry in reports}

    runs: dict[str, dict[int, dict]] = {arm: {} for arm in settings["arms"]}
    with atomic_output_dir(out, overwrite) as staging, tempfile.TemporaryDirectory(prefix="lns-healing-") as scratch:
        for seed in settings["seeds"]:
            for arm in settings["arms"]:
                print(f"\n== {arm}, seed {seed}: {ARMS[arm][0]} ({settings['steps']} steps)", flush=True)
                run_started = time.time()
                run_dir = Path(scratch) / arm / f"seed-{seed}"
                result = train_from_dict(recipe_for(arm, settings, run_dir, seed), command="pretrain")
                metrics = result.metrics
                curve = eval_curve(metrics["log_history"], arm, settings["ramp_steps"], tokens_per_step)
                analysed = analyze_model(result.model, windows, name=f"{arm} (seed {seed})", source=source)
                if seed == settings["seeds"][0]:
                    reports.append({**analysed, "name": arm})
                runs[arm][seed] = {
                    "eval_curve": curve,
                    "final_eval_perplexity": curve[-1]["eval_perplexity"],
                    "final_eval_loss": curve[-1]["eval_loss"],
                    "tokens_seen": metrics["train"]["tokens_seen"],
                    "train_runtime_seconds": metrics["train"].get("train_runtime"),
                    "wall_seconds": None,
                    "final_lns_alpha": None if arm == "stock" else float(result.model.config.lns["alpha"]),
                    "depth": depth_entry(analysed),
                }
                kept = staging / "runs" / arm / f"seed-{seed}"
                kept.parent.mkdir(parents=True, exist_ok=True)
                if keep_models:
                    shutil.move(str(result.output_dir), kept)
                else:
                    kept.mkdir()
                    for name in ("metrics.json", "recipe.yaml"):
                        shutil.copy2(result.output_dir / name, kept / name)
                del result
                gc.collect()
                runs[arm][seed]["wall_seconds"] = round(time.time() - run_started, 1)
                print(f"   final held-out perplexity {runs[arm][seed]['final_eval_perplexity']:.3f} "
                      f"({runs[arm][seed]['wall_seconds']:.0f} s)", flush=True)

        # Within a seed every arm must have seen the same tokens. Between seeds the count may differ by a
        # few tokens: a seed whose order draws the corpus's last, shorter packed row counts its padding out.
        tokens_by_seed = {}
        for seed in settings["seeds"]:
            tokens = {arm: runs[arm][seed]["tokens_seen"] for arm in settings["arms"]}
            if len(set(tokens.values())) != 1:
                raise LNSError(f"the arms of seed {seed} saw different numbers of tokens ({tokens}); the comparison "
                               "would be unfair")
            tokens_by_seed[seed] = next(iter(tokens.values()))
        report = build_report(reports, {"source": f"held-out split of {settings['data']}", "max_tokens": settings["analysis_tokens"],
                                        "seq_len": settings["seq_len"], "batch_size": 8, "last_token": False,
                                        "text_field": settings["text_field"], "split": "held-out", "tasks": None,
                                        "tasks_limit": None})
        (staging / "depth").mkdir()
        write_outputs(report, staging / "depth")
        references = reference_perplexities(runs)
        results = {
            "study": "healing",
            "settings": {**settings, "tokens_per_step": tokens_per_step, "source_checkpoint": source},
            "tokens_per_arm": max(tokens_by_seed.values()),
            "tokens_by_seed": tokens_by_seed,
            **references,
            "depth_before": depth,
            "runs": runs,
            "arms": {arm: aggregate_arm(arm, runs, references) for arm in settings["arms"]},
            "wall_seconds": round(time.time() - started, 1),
        }
        results["verdict"] = verdict(results)
        (staging / "results.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        write_perplexity_plot(results, staging / "eval_perplexity.png")
        if any(entry["effective_scales"] for entry in results["arms"].values()):
            write_effective_scales_plot(results, staging / "effective_scales.png")
        (staging / "summary.md").write_text(summary_markdown(results), encoding="utf-8")
    return results


# --- aggregation over seeds -----------------------------------------------------------------------


def spread(values) -> dict | None:
    """Mean, sample standard deviation, min and max of the finite values (None when there are none)."""
    values = [value for value in values if isinstance(value, (int, float)) and math.isfinite(value)]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def reference_perplexities(runs: dict) -> dict:
    """Held-out perplexity of the base and of the freshly converted model, read off the step-0 evaluations
    (the stock and ramp arms start as the base; the other LNS arms as the converted model)."""
    def step0(arms):
        values = [run["eval_curve"][0]["eval_perplexity"] for arm in arms if arm in runs for run in runs[arm].values()
                  if run["eval_curve"] and run["eval_curve"][0]["step"] == 0]
        return statistics.fmean(values) if values else None

    return {"base_eval_perplexity": step0(["stock", "lns-ramp"]),
            "converted_eval_perplexity": step0([arm for arm in ARMS if arm not in ("stock", "lns-ramp")])}


def aggregate_arm(arm: str, runs: dict, references: dict) -> dict:
    by_seed = runs[arm]
    seeds = list(by_seed)
    steps = [point["step"] for point in by_seed[seeds[0]]["eval_curve"]]
    curve = []
    for position, step in enumerate(steps):
        values = [by_seed[seed]["eval_curve"][position]["eval_perplexity"] for seed in seeds]
        curve.append({"step": step, "tokens": by_seed[seeds[0]]["eval_curve"][position]["tokens"],
                      "lns_alpha": by_seed[seeds[0]]["eval_curve"][position]["lns_alpha"], "eval_perplexity": spread(values)})
    vs_stock = None
    if arm != "stock" and "stock" in runs:
        vs_stock = spread(100.0 * (by_seed[seed]["final_eval_perplexity"] / runs["stock"][seed]["final_eval_perplexity"] - 1.0)
                          for seed in seeds)
    recovery = None
    if arm != "stock":
        per_seed = {seed: recovery_tokens(by_seed[seed]["eval_curve"], references["base_eval_perplexity"],
                                          references["converted_eval_perplexity"]) for seed in seeds}
        recovery = {level: {"per_seed": [per_seed[seed][level] for seed in seeds],
                            "tokens": spread(per_seed[seed][level] for seed in seeds
                                             if isinstance(per_seed[seed][level], int))}
                    for level in next(iter(per_seed.values()))}
    depth = [by_seed[seed]["depth"] for seed in seeds]
    effective = None
    if all(entry["effective_scales"] for entry in depth):
        scales = [entry["effective_scales"] for entry in depth]
        norms = list(scales[0]["per_block"])
        effective = {
            "nominal": scales[0]["nominal"],
            "per_block_mean": {norm: [statistics.fmean(s["per_block"][norm][index] for s in scales)
                                      for index in range(len(scales[0]["nominal"]))] for norm in norms},
            **{key: {norm: spread(s[key][norm] for s in scales) for norm in norms}
               for key in ("ratio_mean", "undone_fraction", "undone_share")},
        }
    return {
        "description": ARMS[arm][0],
        "seeds": seeds,
        "eval_curve": curve,
        "start_eval_perplexity": spread(by_seed[seed]["eval_curve"][0]["eval_perplexity"] for seed in seeds),
        "final_eval_perplexity": spread(by_seed[seed]["final_eval_perplexity"] for seed in seeds),
        "final_vs_stock_percent": vs_stock,
        "recovery_tokens": recovery,
        "middle_removal_loss_increase": spread(entry["middle_removal_loss_increase"] for entry in depth),
        "last_output_variance": spread(entry["last_output_variance"] for entry in depth),
        "effective_scales": effective,
        "wall_seconds": spread(by_seed[seed]["wall_seconds"] for seed in seeds),
    }


# --- verdict and report ---------------------------------------------------------------------------


def _mean(entry) -> float | None:
    return None if entry is None else entry["mean"]


def _pm(entry, digits: int = 2, fixed: bool = False) -> str:
    """'mean (min to max)' of a spread, or '-'; ``fixed``: never in e-notation."""
    if entry is None:
        return "-"
    fmt = (lambda value: f"{value + 0.0:.{digits}f}".replace("-0.000", "0.000")) if fixed else (lambda value: _fmt(value, digits))
    low, high = fmt(entry["min"]), fmt(entry["max"])
    if entry["n"] == 1 or low == high:
        return fmt(entry["mean"])
    return f"{fmt(entry['mean'])} ({low} to {high})"


def _signed(entry) -> str:
    if entry is None:
        return "-"
    if entry["n"] == 1:
        return f"{entry['mean']:+.1f}%"
    return f"{entry['mean']:+.1f}% ({entry['min']:+.1f} to {entry['max']:+.1f})"


def _tokens(value) -> str:
    if value is None:
        return "-"
    if value == "not reached":
        return value
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.0f}K"


def _recovery_text(entry: dict | None, level: str) -> str:
    if entry is None:
        return "-"
    per_seed = entry[level]["per_seed"]
    if all(value is None for value in per_seed):
        return "-"
    reached = [value for value in per_seed if isinstance(value, int)]
    if not reached:
        return "not reached"
    text = _tokens(statistics.fmean(reached)) if len(set(reached)) == 1 else f"{_tokens(min(reached))}-{_tokens(max(reached))}"
    missed = len(per_seed) - len(reached)
    return text + (f" ({missed} of {len(per_seed)} seeds not reached)" if missed else "")


def _change(new: float, old: float) -> float:
    """Relative change of ``new`` against ``old``, in percent (negative: lower)."""
    return 100.0 * (new / old - 1.0)


def verdict(results: dict) -> dict:
    """Plain-words answers, each built from the measured numbers only."""
    arms, settings = results["arms"], results["settings"]
    seeds = len(settings["seeds"])
    final = {arm: _mean(entry["final_eval_perplexity"]) for arm, entry in arms.items()}
    ranking = sorted(final, key=lambda arm: final[arm] if final[arm] is not None else math.inf)
    lines = {"ranking": ranking, "final_eval_perplexity": final}

    # 1. does LNS with distillation match or beat stock at equal tokens?
    distill = [arm for arm in ("lns-distill", "lns-distill-frozen") if arm in arms]
    if "stock" in arms and distill:
        best = min(distill, key=lambda arm: final[arm])
        change = arms[best]["final_vs_stock_percent"]
        stock_spread = arms["stock"]["final_eval_perplexity"]
        if change["max"] < 0:
            outcome = "beat"
        elif change["min"] > 0 and final[best] > stock_spread["max"]:
            outcome = "lost to"
        else:
            outcome = "matched (within the seed spread)"
        lines["distill_vs_stock"] = outcome
        lines["headline"] = (
            f"LNS healed by distillation {outcome} the stock model at equal tokens: {best} ended at held-out perplexity "
            f"{_pm(arms[best]['final_eval_perplexity'])} against {_pm(stock_spread)} for stock "
            f"({_signed(change)} per seed, {seeds} seed{'s' if seeds > 1 else ''}, {results['tokens_per_arm']:,} tokens per run).")
        base = results["base_eval_perplexity"]
        if base is not None:
            # Distillation's target is the source's own predictions; the LM loss can move past them, and
            # does so most where the corpus is not the one the base was trained on.
            lines["headline"] += (
                f" Distillation aims at the base model's own predictions (held-out perplexity {base:.2f} before any "
                f"training): {best} ended {_change(final[best], base):+.1f}% from it, stock {_change(final['stock'], base):+.1f}%.")
    elif "stock" in arms:
        lns = [arm for arm in ranking if arm != "stock"]
        lines["headline"] = (f"{ranking[0]} came out ahead (final held-out perplexity {final[ranking[0]]:.2f}); "
                             + (f"the best LNS arm, {lns[0]}, {_signed(arms[lns[0]]['final_vs_stock_percent'])} against stock."
                                if lns else "only the stock arm ran."))
    else:
        lines["headline"] = (f"{ranking[0]} came out ahead (final held-out perplexity {final[ranking[0]]:.2f}); "
                             "no stock arm ran, so nothing is compared with stock.")

    # 2. how many tokens did recovery take?
    base, converted = results["base_eval_perplexity"], results["converted_eval_perplexity"]
    if base is not None and converted is not None:
        parts = []
        for arm, entry in arms.items():
            if arm == "stock":
                continue
            parts.append(f"{arm} {_recovery_text(entry['recovery_tokens'], '90%')} / {_recovery_text(entry['recovery_tokens'], '99%')}")
        lines["recovery"] = (f"The conversion alone moved held-out perplexity from {base:.2f} to {converted:.2f} "
                             f"({_change(converted, base):+.1f}%). Tokens to recover 90% / 99% of that jump: "
                             + "; ".join(parts) + ".")
    else:
        lines["recovery"] = ("Recovery needs the base's and the converted model's step-0 perplexity: run stock or lns-ramp "
                             "and one of the other LNS arms.")

    # 3. did healing undo the scaling? norms-trained arms against frozen ones
    trained = [arm for arm in ("lns-lm", "lns-distill", "lns-ramp") if arm in arms and arms[arm]["effective_scales"]]
    frozen = [arm for arm in ("lns-lm-frozen", "lns-distill-frozen") if arm in arms and arms[arm]["effective_scales"]]
    if trained:
        parts, worst = [], 0.0
        for arm in trained:
            scales = arms[arm]["effective_scales"]
            share = max(_mean(value) for value in scales["undone_share"].values())
            undone = max(_mean(value) for value in scales["undone_fraction"].values())
            ratio = ", ".join(f"{norm} x{_mean(value):.3f}" for norm, value in scales["ratio_mean"].items())
            parts.append(f"{arm}: effective / nominal {ratio}, {share:.1%} of the way back to the source's norms, "
                         f"{undone:.0%} of the scaled blocks above {UNDONE_ABOVE}")
            worst = max(worst, share, undone)
        if worst >= 0.5:
            call = "Healing with trained norms undid most of the scaling"
        elif worst >= 0.1:
            call = "Healing with trained norms undid part of the scaling"
        else:
            call = "Healing with trained norms kept the scaling"
        frozen_text = ""
        if frozen:
            frozen_final = ", ".join(f"{arm} {final[arm]:.2f}" for arm in frozen)
            frozen_text = (f" The frozen arms keep it by construction (effective / nominal exactly 1); their final "
                           f"perplexity: {frozen_final}, against {', '.join(f'{arm} {final[arm]:.2f}' for arm in trained)}.")
        lines["undo"] = f"{call} ({'; '.join(parts)}; a full undo is x sqrt(l)).{frozen_text}"
    else:
        lines["undo"] = "No norms-trained LNS arm ran, so whether healing undoes the scaling was not measured."
    return lines


def write_perplexity_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for arm, entry in results["arms"].items():
        tokens = [point["tokens"] / 1e3 for point in entry["eval_curve"]]
        stats = [point["eval_perplexity"] for point in entry["eval_curve"]]
        line, = axes.plot(tokens, [s["mean"] for s in stats], marker="o", markersize=2.5, linewidth=1.2,
                          label=f"{arm} (final {_fmt(_mean(entry['final_eval_perplexity']))})")
        if len(entry["seeds"]) > 1:
            axes.fill_between(tokens, [s["min"] for s in stats], [s["max"] for s in stats], color=line.get_color(), alpha=0.18)
    settings = results["settings"]
    if "lns-ramp" in results["arms"]:
        ramp = settings["ramp_steps"] * settings["tokens_per_step"] / 1e3
        axes.axvline(ramp, color="grey", linestyle=":", linewidth=1, label="lns-ramp reaches full LNS")
    if results["base_eval_perplexity"]:
        axes.axhline(results["base_eval_perplexity"], color="black", linestyle="--", linewidth=0.8, label="base, before healing")
    log_axis(axes)
    axes.set_xlabel("training tokens (thousands)")
    axes.set_ylabel("held-out perplexity")
    seeds = settings["seeds"]
    axes.set_title(f"Healing {Path(str(settings['model'])).name}: {results['tokens_per_arm']:,} tokens per run; "
                   f"mean and min-max over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}", fontsize=9)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_effective_scales_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    arms = {arm: entry for arm, entry in results["arms"].items() if entry["effective_scales"]}
    first = next(iter(arms.values()))["effective_scales"]
    blocks = list(range(1, len(first["nominal"]) + 1))
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    axes.plot(blocks, first["nominal"], color="black", linestyle="--", linewidth=1, label="nominal 1/sqrt(l) (scaling kept)")
    axes.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="1 (scaling undone)")
    styles = ["-", "-."]
    for arm, entry in arms.items():
        color = None
        for position, (norm, values) in enumerate(entry["effective_scales"]["per_block_mean"].items()):
            line, = axes.plot(blocks, values, marker="o", markersize=2.5, linewidth=1.1, color=color,
                              linestyle=styles[position % len(styles)], label=f"{arm}: {norm}")
            color = line.get_color()
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("block l")
    axes.set_ylabel("effective scale ||c*w|| / ||w_base||")
    axes.set_title(f"Effective LNS scale after healing (mean over {len(results['settings']['seeds'])} seed(s))", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    if abs(value) < 1e-9:  # rounding noise of an exact zero (a frozen norm's share undone)
        return f"{0:.{digits}f}"
    if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3):
        return f"{value:.{digits}e}"
    return f"{value:.{digits}f}"


def _per_seed_tokens(results: dict) -> str:
    counts = results["tokens_by_seed"]
    if len(set(counts.values())) == 1:
        return ""
    return " at most; by seed " + ", ".join(f"{seed}: {count:,}" for seed, count in counts.items())


def summary_markdown(results: dict) -> str:
    settings, arms, verdict_ = results["settings"], results["arms"], results["verdict"]
    seeds = settings["seeds"]
    lines = [f"# Healing study: `{settings['model']}` on `{settings['data']}`", ""]
    lines.append(
        f"{settings['steps']} optimizer steps per run x {settings['batch_size']} sequences x {settings['seq_len']} tokens "
        f"({results['tokens_per_arm']:,} training tokens per run{_per_seed_tokens(results)}, the same tokens in the same order "
        "for every arm of a seed), "
        f"seeds {', '.join(map(str, seeds))} (data order), lr {settings['learning_rate']:g} (cosine, "
        f"{settings['warmup_steps']} warm-up steps), ramp {settings['ramp_steps']} steps, distillation weight "
        f"{settings['distill_weight']:g} at temperature {settings['distill_temperature']:g}. Perplexity on the held-out "
        f"{settings['eval_fraction']:g} of the records (split seed {settings['split_seed']}). Values: mean over seeds "
        "(min to max).")
    lines += ["", f"**{verdict_['headline']}**", "", verdict_["recovery"], "", verdict_["undo"], ""]
    if len(seeds) < 3:
        lines += ["Fewer than three seeds: treat differences of a percent or two as indicative, not settled.", ""]

    lines += ["## Outcome per arm", "",
              "| arm | step 0 | final | vs stock (same seed) | tokens to 90% / 99% recovery | middle-third removal drop (nats) "
              "| last-block variance |", "|---|---|---|---|---|---|---|"]
    before = results["depth_before"]
    for name, entry in before.items():
        lines.append(f"| *{name}* | - | - | - | - | {_fmt(entry['middle_removal_loss_increase'], 3)} "
                     f"| {_fmt(entry['last_output_variance'])} |")
    for arm, entry in arms.items():
        lines.append(f"| {arm} | {_pm(entry['start_eval_perplexity'])} | **{_pm(entry['final_eval_perplexity'])}** "
                     f"| {_signed(entry['final_vs_stock_percent'])} | {_recovery_text(entry['recovery_tokens'], '90%')} / "
                     f"{_recovery_text(entry['recovery_tokens'], '99%')} | {_pm(entry['middle_removal_loss_increase'], 3)} "
                     f"| {_pm(entry['last_output_variance'])} |")

    effective = {arm: entry["effective_scales"] for arm, entry in arms.items() if entry["effective_scales"]}
    if effective:
        norms = list(next(iter(effective.values()))["ratio_mean"])
        lines += ["", "## Effective LNS scales (against the base checkpoint)", "",
                  f"Over the scaled blocks 2..L: mean effective / nominal scale (1 = scaling kept, sqrt(l) = undone), "
                  f"share of the way back to the source's norms (0 = kept, 1 = undone) and fraction of blocks whose "
                  f"effective scale is above {UNDONE_ABOVE}.", ""]
        lines.append("| arm | " + " | ".join(f"{norm}: eff/nominal | {norm}: share undone | {norm}: blocks > {UNDONE_ABOVE}"
                                             for norm in norms) + " |")
        lines.append("|---|" + "---|---|---|" * len(norms))
        for arm, scales in effective.items():
            cells = []
            for norm in norms:
                cells += [_pm(scales["ratio_mean"][norm], 3, fixed=True), _pm(scales["undone_share"][norm], 3, fixed=True),
                          _pm(scales["undone_fraction"][norm], 2, fixed=True)]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        nominal = next(iter(effective.values()))["nominal"]
        lines += ["", "Per block (mean over seeds):", ""]
        columns = [(arm, norm) for arm in effective for norm in norms]
        lines.append("| block | nominal | " + " | ".join(f"{arm} {norm}" for arm, norm in columns) + " |")
        lines.append("|---|---|" + "---|" * len(columns))
        for index, scale in enumerate(nominal):
            lines.append(f"| {index + 1} | {scale:.3f} | "
                         + " | ".join(_fmt(effective[arm]["per_block_mean"][norm][index], 3) for arm, norm in columns) + " |")

    lines += ["", "## Held-out perplexity by step", ""]
    lines.append("| step | tokens | " + " | ".join(arms) + " |")
    lines.append("|---|---|" + "---|" * len(arms))
    steps = next(iter(arms.values()))["eval_curve"]
    for position, point in enumerate(steps):
        cells = []
        for entry in arms.values():
            at = entry["eval_curve"][position]
            alpha = "" if at["lns_alpha"] in (None, 1.0) else f" (alpha {at['lns_alpha']:.2f})"
            cells.append(_pm(at["eval_perplexity"]) + alpha)
        lines.append(f"| {point['step']} | {_tokens(point['tokens'])} | " + " | ".join(cells) + " |")

    lines += ["", "![held-out perplexity](eval_perplexity.png)", ""]
    if effective:
        lines += ["![effective LNS scales](effective_scales.png)", ""]
    wall = ", ".join(f"{arm} {_fmt(_mean(entry['wall_seconds']), 0)} s" for arm, entry in arms.items())
    lines += [f"Wall time per run (mean): {wall}; whole study {results['wall_seconds']:.0f} s.", "",
              "Full depth report of the base, the converted model and each arm's first-seed model: "
              "[depth/summary.md](depth/summary.md).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up temporary folders
    from lns_surgery.core.errors import LNSError

    try:
        if args.prepare_smollm2 is None or args.data is not None or args.steps is not None:
            # checked before the slow imports and the preparation, so that a bad option fails at once
            settings = study_settings(argparse.Namespace(**{**vars(args), "model": args.model or str(args.prepare_smollm2)}))
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.prepare_smollm2 is not None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from prepare_smollm2 import PrepareError, prepare_smollm2

            try:
                prepared = prepare_smollm2(args.prepare_smollm2)
            except PrepareError as exc:
                raise LNSError(str(exc)) from None
            if args.data is None and args.steps is None:
                return 0
            settings["model"] = args.model or str(prepared)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        results = run_study(settings, args.out, overwrite=args.overwrite, keep_models=args.keep_models)
    except LNSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verdict_ = results["verdict"]
    print("\n" + verdict_["headline"])
    print(verdict_["recovery"])
    print(verdict_["undo"])
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
