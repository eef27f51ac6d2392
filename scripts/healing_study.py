#!/usr/bin/env python
"""Healing study: does LayerNorm Scaling pay off on *this* pretrained model?

    python scripts/healing_study.py --model ../shared/models/stories260K \\
        --data ../shared/data/c4-sample/c4_sample300.jsonl --steps 150 --threads 1 --out out/healing-study

Continues pre-training a stock (Pre-LN) checkpoint three times, on the same tokens in the same order
with the same seed, learning-rate schedule and evaluation data:

- ``stock``: the base model as it is (no LNS), the baseline any surgery has to beat;
- ``lns-immediate``: converted to LNS on load (every block's pre-norm outputs times 1/sqrt(l) from
  the first step), then trained;
- ``lns-ramp``: converted with alpha 0 (the original function) and ramped linearly to full LNS over
  the first ``--ramp-steps`` optimizer steps (``lns_ramp_steps``).

Each arm is evaluated on the held-out split before training and every ``--eval-every`` steps. The
untouched base and every final model then get the depth diagnostics of ``lns-surgery analyze``
(output variance, angular distance, layer-removal loss) on the same held-out windows.

Writes into ``--out`` (which appears only once everything is written):

- ``results.json``: settings, each arm's evaluation curve and final perplexity, a compact per-block
  depth summary and the verdict;
- ``summary.md``: which arm came out ahead and by how much, in plain words, with the tables;
- ``eval_perplexity.png``: held-out perplexity against optimizer step for the three arms;
- ``depth/``: the full depth report of the base and the three final models (``report.json``,
  ``summary.md``, variance, removal and angular-distance plots);
- ``runs/<arm>/``: each run's ``metrics.json`` and ``recipe.yaml`` (with ``--keep-models``, also the
  trained model).

A single seed: treat differences of a percent or two as indicative, not settled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from lns_surgery.analysis.plots import log_axis
from lns_surgery.analysis.report import json_safe

ARMS = {
    "stock": "base model trained on as it is (no LNS)",
    "lns-immediate": "converted to LNS, full 1/sqrt(l) from the first step",
    "lns-ramp": "converted to LNS, alpha ramped 0 -> 1 over the first ramp steps",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", required=True, help="stock (Pre-LN) checkpoint: a folder or Hub id")
    parser.add_argument("--data", required=True, help="training text: a local .jsonl/.json/.txt/.parquet file or a Hub dataset")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps per arm (the same token budget for each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and of the held-out split (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("out/healing-study"), help="output folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--ramp-steps", type=int, default=None,
                        help="steps of the lns-ramp arm's ramp (default: a quarter of --steps)")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: a tenth of --steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine schedule (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of --steps)")
    parser.add_argument("--eval-fraction", type=float, default=0.1,
                        help="held-out fraction of --data's records (default: %(default)s)")
    parser.add_argument("--text-field", default="text", help="record field holding the text (default: %(default)s)")
    parser.add_argument("--analysis-tokens", type=int, default=16384,
                        help="held-out tokens for the depth diagnostics (default: %(default)s)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; on a busy machine 1 is often fastest)")
    parser.add_argument("--keep-models", action="store_true", help="keep each arm's trained model under runs/<arm>/")
    return parser.parse_args(argv)


# --- the three runs -----------------------------------------------------------------------------


def study_settings(args) -> dict:
    """The settings every arm shares, with the defaults that depend on --steps resolved."""
    from lns_surgery.errors import LNSError

    if args.steps < 1:
        raise LNSError("--steps must be at least 1")
    ramp = args.ramp_steps if args.ramp_steps is not None else max(1, args.steps // 4)
    if not 1 <= ramp <= args.steps:
        raise LNSError(f"--ramp-steps must be between 1 and --steps ({args.steps}), so that the ramp arm ends at full LNS")
    eval_every = args.eval_every or max(1, args.steps // 10)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    if not 0.0 < args.eval_fraction < 1.0:
        raise LNSError("--eval-fraction must be between 0 and 1")
    return {"model": args.model, "data": args.data, "steps": args.steps, "seed": args.seed, "ramp_steps": ramp,
            "eval_every": eval_every, "batch_size": args.batch_size, "seq_len": args.seq_len, "learning_rate": args.lr,
            "lr_schedule": "cosine", "warmup_steps": warmup, "eval_fraction": args.eval_fraction,
            "text_field": args.text_field, "analysis_tokens": args.analysis_tokens, "cpu": bool(args.cpu),
            "threads": args.threads}


def recipe_for(arm: str, settings: dict, output_dir: Path) -> dict:
    """The training recipe (``lns-surgery pretrain`` keys) of one arm; only the LNS keys differ."""
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
        "per_device_eval_batch_size": settings["batch_size"],
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
        "seed": settings["seed"],
        "data_seed": settings["seed"],
        "use_cpu": settings["cpu"],
        "output_dir": str(output_dir),
        "overwrite": True,
    }
    if arm == "lns-immediate":
        recipe["lns_convert"] = True
    elif arm == "lns-ramp":
        recipe.update(lns_convert=True, lns_ramp_steps=settings["ramp_steps"])
    return recipe


def eval_curve(log_history: list[dict], arm: str, ramp_steps: int) -> list[dict]:
    """(step, eval loss, eval perplexity, LNS alpha the model computed with) for each evaluation, one per step."""
    from lns_surgery.training.callbacks import ramp_alpha

    by_step = {}
    for entry in log_history:
        if "eval_loss" in entry:  # the final evaluation repeats the last step's: keep one
            by_step[int(entry["step"])] = float(entry["eval_loss"])
    curve = []
    for step, loss in sorted(by_step.items()):
        alpha = None if arm == "stock" else 1.0 if arm == "lns-immediate" else ramp_alpha(step, ramp_steps)
        curve.append({"step": step, "eval_loss": loss, "eval_perplexity": _exp(loss), "lns_alpha": alpha})
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


def depth_entry(report_entry: dict) -> dict:
    """The per-block numbers of an analysis report entry that the summary compares."""
    return {
        "perplexity": report_entry["perplexity"],
        "status": report_entry["status"],
        "lns_alpha": report_entry["lns_alpha"],
        "output_variance": [layer["output_variance"] for layer in report_entry["layers"]],
        "angular_distance_next": [layer["angular_distance_next"] for layer in report_entry["layers"]],
        "removal_loss_increase": [layer["removal_loss_increase"] for layer in report_entry["layers"]],
    }


def run_study(settings: dict, out: Path, *, overwrite: bool = False, keep_models: bool = False) -> dict:
    """Train the three arms, analyse them and write the study folder ``out``; returns results.json's content."""
    import gc

    import torch

    from lns_surgery import is_lns_model, load_model, load_tokenizer
    from lns_surgery.analysis import analyze_model, token_windows
    from lns_surgery.analysis.report import build_report, write_outputs
    from lns_surgery.conversion.checkpoint import atomic_output_dir, check_output
    from lns_surgery.errors import LNSError
    from lns_surgery.training.run import train_from_dict

    check_output(out, overwrite)
    started = time.time()
    tokenizer = load_tokenizer(settings["model"])
    base = load_model(settings["model"], dtype=torch.float32)
    if torch.cuda.is_available() and not settings["cpu"]:  # the trained arms are analysed where they trained
        base.to("cuda")
    if is_lns_model(base) or getattr(base.config, "lns_folded", None):
        raise LNSError(f"'{settings['model']}' already has LayerNorm Scaling; the study starts from a stock (Pre-LN) model")
    texts = held_out_texts(recipe_for("stock", settings, out))
    windows = token_windows(tokenizer, texts, settings["seq_len"], settings["analysis_tokens"])
    print(f"held-out split: {len(texts)} records; depth diagnostics on {windows.shape[0]} windows of {windows.shape[1]} tokens",
          flush=True)
    analysed = [analyze_model(base, windows, name="base (untouched)")]
    del base

    arms = {}
    with atomic_output_dir(out, overwrite) as staging, tempfile.TemporaryDirectory(prefix="lns-healing-") as scratch:
        for arm, description in ARMS.items():
            print(f"\n== {arm}: {description} ({settings['steps']} steps)", flush=True)
            run_dir = Path(scratch) / arm
            result = train_from_dict(recipe_for(arm, settings, run_dir), command="pretrain")
            metrics = result.metrics
            curve = eval_curve(metrics["log_history"], arm, settings["ramp_steps"])
            arms[arm] = {
                "description": description,
                "eval_curve": curve,
                "start_eval_perplexity": curve[0]["eval_perplexity"],
                "final_eval_perplexity": metrics["eval"]["eval_perplexity"],
                "final_eval_loss": metrics["eval"]["eval_loss"],
                "tokens_seen": metrics["train"]["tokens_seen"],
                "train_runtime_seconds": metrics["train"].get("train_runtime"),
                "final_lns_alpha": None if arm == "stock" else float(result.model.config.lns["alpha"]),
            }
            analysed.append(analyze_model(result.model, windows, name=arm))
            kept = staging / "runs" / arm
            kept.parent.mkdir(exist_ok=True)
            if keep_models:
                shutil.move(str(result.output_dir), kept)
            else:
                kept.mkdir()
                for name in ("metrics.json", "recipe.yaml"):
                    shutil.copy2(result.output_dir / name, kept / name)
            del result
            gc.collect()

        tokens = {entry["tokens_seen"] for entry in arms.values()}
        if len(tokens) != 1:
            raise LNSError(f"the arms saw different numbers of tokens ({sorted(tokens)}); the comparison would be unfair")
        report = build_report(analysed, {"source": f"held-out split of {settings['data']}", "max_tokens": settings["analysis_tokens"],
                                         "seq_len": settings["seq_len"], "batch_size": 8, "last_token": False,
                                         "text_field": settings["text_field"], "split": "held-out", "tasks": None,
                                         "tasks_limit": None})
        (staging / "depth").mkdir()
        write_outputs(report, staging / "depth")
        results = {
            "study": "healing",
            "settings": {**settings, "tokens_per_step": settings["batch_size"] * settings["seq_len"]},
            "tokens_per_arm": tokens.pop(),
            "base_eval_perplexity": arms["stock"]["start_eval_perplexity"],
            "arms": arms,
            "depth": {entry["name"]: depth_entry(entry) for entry in report["models"]},
            "wall_seconds": round(time.time() - started, 1),
        }
        results["verdict"] = verdict(results)
        (staging / "results.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        write_plot(results, staging / "eval_perplexity.png")
        (staging / "summary.md").write_text(summary_markdown(results), encoding="utf-8")
    return results



def _change(new: float, old: float) -> float:
    """Relative change of ``new`` against ``old``, in percent (negative: lower)."""
    return 100.0 * (new / old - 1.0)


def verdict(results: dict) -> dict:
    arms = results["arms"]
    ranking = sorted(arms, key=lambda arm: arms[arm]["final_eval_perplexity"])
    best, stock = ranking[0], arms["stock"]["final_eval_perplexity"]
    final = {arm: arms[arm]["final_eval_perplexity"] for arm in ranking}
    lns_best = min(("lns-immediate", "lns-ramp"), key=lambda arm: final[arm])
    change = _change(final[lns_best], stock)
    if best == "stock":
        headline = (f"The stock model came out ahead: final held-out perplexity {stock:.2f}, against {final[lns_best]:.2f} "
                    f"for the better LNS arm ({lns_best}, {change:+.1f}%). On this budget LNS did not pay off.")
    else:
        headline = (f"{best} came out ahead: final held-out perplexity {final[best]:.2f}, {abs(change):.1f}% below the stock "
                    f"model trained on the same tokens ({stock:.2f}).")
    other = "lns-ramp" if lns_best == "lns-immediate" else "lns-immediate"
    ramp_vs_immediate = (f"{lns_best} beat {other} ({final[lns_best]:.2f} vs {final[other]:.2f}, "
                         f"{_change(final[lns_best], final[other]):+.1f}%).")
    base = results["base_eval_perplexity"]
    surgery = arms["lns-immediate"]["start_eval_perplexity"]
    return {
        "ranking": ranking,
        "best": best,
        "final_eval_perplexity": final,
        "best_lns_vs_stock_percent": change,
        "surgery_perplexity_change_percent": _change(surgery, base),
        "headline": headline,
        "lns_arms": ramp_vs_immediate,
        "surgery": (f"The conversion alone (no training) moved held-out perplexity from {base:.2f} to {surgery:.2f} "
                    f"({_change(surgery, base):+.1f}%)."),
    }




def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for arm, entry in results["arms"].items():
        steps = [point["step"] for point in entry["eval_curve"]]
        values = [point["eval_perplexity"] for point in entry["eval_curve"]]
        axes.plot(steps, values, marker="o", markersize=3, label=f"{arm} (final {entry['final_eval_perplexity']:.2f})")
    ramp = results["settings"]["ramp_steps"]
    axes.axvline(ramp, color="grey", linestyle=":", linewidth=1, label=f"ramp reaches full LNS (step {ramp})")
    log_axis(axes)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("held-out perplexity")
    settings = results["settings"]
    name = Path(str(settings["model"])).name
    axes.set_title(f"Healing {name}: {results['tokens_per_arm']:,} tokens per arm, seed {settings['seed']}",
                   fontsize=10)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3):
        return f"{value:.{digits}e}"
    return f"{value:.{digits}f}"


def summary_markdown(results: dict) -> str:
    settings, arms, verdict_ = results["settings"], results["arms"], results["verdict"]
    lines = [f"# Healing study: `{settings['model']}` on `{settings['data']}`", ""]
    lines.append(
        f"{settings['steps']} optimizer steps per arm x {settings['batch_size']} sequences x {settings['seq_len']} tokens "
        f"({results['tokens_per_arm']:,} training tokens per arm, the same tokens in the same order), seed {settings['seed']}, "
        f"lr {settings['learning_rate']:g} (cosine, {settings['warmup_steps']} warm-up steps), ramp {settings['ramp_steps']} steps. "
        f"Perplexity on the held-out {settings['eval_fraction']:g} of the records.")
    lines += ["", f"**{verdict_['headline']}** {verdict_['lns_arms']} {verdict_['surgery']}", ""]
    lines.append("One seed: treat differences of a percent or two as indicative, not settled.")

    steps = sorted({point["step"] for entry in arms.values() for point in entry["eval_curve"]})
    lines += ["", "## Held-out perplexity by step", ""]
    lines.append("| step | " + " | ".join(arms) + " |")
    lines.append("|---|" + "---|" * len(arms))
    for step in steps:
        cells = []
        for entry in arms.values():
            point = next((p for p in entry["eval_curve"] if p["step"] == step), None)
            alpha = "" if point is None or point["lns_alpha"] in (None, 1.0) else f" (alpha {point['lns_alpha']:.2f})"
            cells.append("-" if point is None else _fmt(point["eval_perplexity"]) + alpha)
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append("| **final** | " + " | ".join(f"**{_fmt(entry['final_eval_perplexity'])}**" for entry in arms.values()) + " |")
    lines.append("| vs stock | " + " | ".join(
        f"{_change(entry['final_eval_perplexity'], arms['stock']['final_eval_perplexity']):+.1f}%" for entry in arms.values()) + " |")

    depth = results["depth"]
    names = list(depth)
    count = len(next(iter(depth.values()))["removal_loss_increase"])
    lines += ["", "## Depth diagnostics (held-out windows)", "",
              "Loss increase (nats/token) when one block is bypassed: larger means the block matters more.", ""]
    lines.append("| block | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for index in range(count):
        lines.append(f"| {index + 1} | " + " | ".join(_fmt(depth[name]["removal_loss_increase"][index], 3) for name in names) + " |")
    lines.append("| output variance, last block | " + " | ".join(_fmt(depth[name]["output_variance"][-1]) for name in names) + " |")
    lines.append("| mean angular distance, input -> output of a block | "
                 + " | ".join(_fmt(sum(depth[name]["angular_distance_next"]) / count, 3) for name in names) + " |")
    lines.append("| perplexity on these windows | " + " | ".join(_fmt(depth[name]["perplexity"]) for name in names) + " |")
    lines += ["", "![held-out perplexity](eval_perplexity.png)", "",
              "Full depth report: [depth/summary.md](depth/summary.md).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up temporary folders
    from lns_surgery.errors import LNSError

    try:
        settings = study_settings(args)
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        if args.threads:
            torch.set_num_threads(args.threads)
        results = run_study(settings, args.out, overwrite=args.overwrite, keep_models=args.keep_models)
    except LNSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n" + results["verdict"]["headline"])
    print(results["verdict"]["lns_arms"], results["verdict"]["surgery"])
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
