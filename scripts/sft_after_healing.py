#!/usr/bin/env python
"""After healing, fine-tuning: does the healed LNS model take chat SFT as well as the stock one?

    python scripts/sft_after_healing.py --study out/healing-smollm2 \\
        --recipe recipes/cpu/sft-smollm2-dolly.yaml --max-steps 30 --out out/sft-after-healing

Takes the models a healing study kept (``scripts/healing_study.py --keep-models``: ``runs/<arm>/seed-<s>/``),
runs the same SFT recipe on each (same data, split, order, steps and learning rate; only
``model_name_or_path`` differs) and compares the held-out loss of the recipe's evaluation split
before and after SFT. The stock arm stays stock (``lns_convert`` is switched off for every model;
the LNS arms already are LNS checkpoints), and only the LoRA adapter is written, to a scratch folder
that is removed afterwards.

Writes ``results.json`` and ``summary.md`` into ``--out`` (which appears only once complete).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--study", type=Path, help="a healing study folder written with --keep-models (every kept model)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER",
                        help="a model to fine-tune, instead of or beside --study's (repeatable); NAME 'stock ...' is the reference")
    parser.add_argument("--recipe", type=Path, required=True, help="the SFT recipe (YAML) every model is trained with")
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's max_steps")
    parser.add_argument("--out", type=Path, default=Path("out/sft-after-healing"), help="output folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if lns-surgery wrote it")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    return parser.parse_args(argv)


def kept_models(study: Path) -> dict[str, Path]:
    """``{"<arm> (seed <s>)": folder}`` for every model the study kept, in the study's arm order."""
    from lns_surgery.core.errors import LNSError

    results = study / "results.json"
    if not results.is_file():
        raise LNSError(f"'{study}' is not a healing study folder (no results.json)")
    order = json.loads(results.read_text(encoding="utf-8"))["settings"]["arms"]
    models = {}
    for arm in order:
        for folder in sorted((study / "runs" / arm).glob("seed-*")):
            if (folder / "config.json").is_file():
                models[f"{arm} ({folder.name.replace('-', ' ')})"] = folder
    if not models:
        raise LNSError(f"'{study}' kept no models; run the study with --keep-models")
    return models


def sft_settings(recipe: dict, model: Path, output_dir: Path, max_steps: int | None) -> dict:
    settings = {**recipe, "model_name_or_path": str(model), "lns_convert": False, "output_dir": str(output_dir),
                "export": "adapter", "eval_on_start": True, "save_strategy": "no", "report_to": "none",
                "disable_tqdm": True}
    if max_steps is not None:
        settings["max_steps"] = max_steps
    # Only the held-out loss before and after is compared: no evaluations in between (minutes each on CPU).
    # A recipe that counts epochs instead of steps keeps its own schedule.
    if settings.get("max_steps", -1) > 0:
        settings.update(eval_strategy="steps", eval_steps=settings["max_steps"])
    return settings


def run(args) -> dict:
    import yaml

    from lns_surgery.core.errors import LNSError
    from lns_surgery.core.lns_status import lns_status
    from lns_surgery.core.outputs import atomic_output_dir, scratch_dir
    from lns_surgery.training import train_from_dict

    recipe = yaml.safe_load(args.recipe.read_text(encoding="utf-8"))
    if not recipe.get("eval_fraction") and not recipe.get("dataset_test_split"):
        raise LNSError("the recipe holds out no evaluation data (eval_fraction or dataset_test_split)")
    models = kept_models(args.study) if args.study else {}
    for entry in args.model:
        name, separator, folder = entry.partition("=")
        if not separator or not name.strip() or not Path(folder, "config.json").is_file():
            raise LNSError(f"--model takes NAME=FOLDER with a model folder; got '{entry}'")
        models[name.strip()] = Path(folder)
    if not models:
        raise LNSError("give --study, --model NAME=FOLDER, or both")
    started = time.time()
    rows = {}
    with atomic_output_dir(args.out, args.overwrite, inputs=[*models.values(), args.recipe], report=True) as staging, \
            scratch_dir("sft-after-healing") as scratch:
        for index, (name, folder) in enumerate(models.items()):
            print(f"\n== SFT of {name}: {folder}", flush=True)
            run_started = time.time()
            result = train_from_dict(sft_settings(recipe, folder, scratch / f"run-{index}", args.max_steps), "sft")
            history = result.metrics["log_history"]
            evaluations = [entry for entry in history if "eval_loss" in entry]
            before, after = evaluations[0]["eval_loss"], result.metrics["eval"]["eval_loss"]
            rows[name] = {"model": str(folder), "lns": lns_status(result.model.config).kind,
                          "eval_loss_before": before, "eval_loss_after": after,
                          "evaluated_at_steps": [entry["step"] for entry in evaluations],
                          "eval_perplexity_after": math.exp(after),
                          "train_tokens": result.metrics["train"]["tokens_seen"],
                          "wall_seconds": round(time.time() - run_started, 1)}
            print(f"   held-out loss {before:.4f} -> {after:.4f}", flush=True)
            del result
        stock = next((row for name, row in rows.items() if name.startswith("stock ")), None)
        for row in rows.values():
            row["after_vs_stock"] = None if stock is None else row["eval_loss_after"] - stock["eval_loss_after"]
        results = {"study": None if args.study is None else str(args.study), "recipe": str(args.recipe), "recipe_settings": recipe,
                   "max_steps": args.max_steps or recipe.get("max_steps"), "models": rows,
                   "wall_seconds": round(time.time() - started, 1)}
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (staging / "summary.md").write_text(summary_markdown(results), encoding="utf-8")
    return results


def summary_markdown(results: dict) -> str:
    from lns_surgery.core.markdown import table

    rows = [[name, row["lns"], f"{row['eval_loss_before']:.4f}", f"{row['eval_loss_after']:.4f}",
             "-" if row["after_vs_stock"] is None else f"{row['after_vs_stock']:+.4f}"]
            for name, row in results["models"].items()]
    lines = ["# SFT after healing", "",
             f"Every model{'' if results['study'] is None else ' of `' + results['study'] + '`'} trained with `{results['recipe']}` for {results['max_steps']} steps "
             "(LoRA, the same data, split and order); held-out loss (nats/token) on the recipe's evaluation split.", "",
             *table(["model", "LNS", "held-out loss before SFT", "after SFT", "after, vs stock"], rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up the scratch folder
    from lns_surgery.core.errors import LNSError

    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        results = run(args)
    except LNSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n" + summary_markdown(results))
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
