#!/usr/bin/env python
"""Small-scale reproduction of "The Curse of Depth in Large Language Models" (Sun et al., 2025):
Pre-LN against LayerNorm Scaling, trained from scratch side by side.

    python scripts/reproduce_paper.py --preset tiny --threads 1      # CPU, about 10 minutes
    python scripts/reproduce_paper.py --preset 130m                  # one GPU: the paper's LLaMA-130M on C4

Both arms start from the same weights (plain normal init, std 0.02; the only difference is the
1/sqrt(l) scale of the pre-norms) and see the same tokens in the same order with the same seed and
schedule. For each arm it records

- held-out perplexity before training, at intervals and at the end;
- the output variance of the residual stream after every block, measured every ``--variance-every``
  steps during training on a fixed set of held-out windows (a ``TrainerCallback``);
- at the end, the depth diagnostics of ``lns-surgery analyze``: angular distance between block
  inputs and the loss increase when each block is removed;

and writes ``results.json``, ``summary.md`` (next to the paper's numbers), ``eval_perplexity.png``,
``variance_through_training.png`` and ``depth/`` (the full depth report) into ``--out``.

Presets:

- ``tiny``: 12 layers, width 128, 4 heads, SwiGLU 352 (2.5M parameters), 300 English C4 documents
  (../shared/data/c4-sample; 10% held out), 300 steps x 8 x 256 tokens, the paper's optimiser settings
  (Adam, lr 1e-3, 10% warm-up, cosine to 0.1x, no weight decay, no clipping). CPU, fp32. The tokenizer
  is stories260K's 512-token BPE (../shared/models/stories260K): with GPT-2's 50257 tokens the LM head
  would hold 85% of the parameters and most of the compute of a width-128 model, and two CPU cores
  would get through only ~150K tokens in 10 minutes; with 512 the compute goes into the 12 blocks,
  which are what the study is about. ``--tokenizer ../shared/models/gpt2-tokenizer`` runs it with
  GPT-2's instead.
- ``130m``: ``recipes/scratch-130m.yaml`` exactly (12 layers, d 768, FFN 2048, 12 heads, T5 tokenizer,
  allenai/c4 streamed, 20K steps x 512 x 256 tokens, lr 1e-3, 2K warm-up, cosine to 0.1x, bf16),
  evaluated on C4 validation. Needs a GPU and the Hugging Face Hub; roughly 3-4 hours per arm on one
  H100/H200. The paper reports perplexity 26.73 (Pre-LN) and 25.76 (LNS).
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
from lns_surgery.core.markdown import table
from lns_surgery.core.reports import json_safe

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LNS_SHARED_DIR", REPO_ROOT.parent / "shared"))

ARMS = {"pre-ln": False, "lns": True}  # arm -> LayerNorm Scaling on

# The paper's reference (LLaMA-130M, C4, 20K steps; Sun et al. 2025, Table 1 and Figure 3).
PAPER = {"perplexity": {"pre-ln": 26.73, "lns": 25.76},
         "last_layer_output_variance": {"pre-ln": 175.0, "lns": 25.0},
         "note": "LLaMA-130M on C4, 2.6B tokens; variance: last layer, within the first 2K steps (Figure 3)"}

TINY_MODEL = {"num_hidden_layers": 12, "hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 4,
              "num_key_value_heads": 4, "max_position_embeddings": 256}


def tiny_preset(steps: int | None) -> dict:
    steps = steps or 300
    seq_len = 256
    return {
        "name": "tiny",
        "model_preset": None,
        "model_overrides": TINY_MODEL,
        "tokenizer": str(SHARED / "models" / "stories260K"),
        "data": str(SHARED / "data" / "c4-sample" / "c4_sample300.jsonl"),
        "data_split": None,  # held out from the file by eval_fraction
        "seq_len": seq_len,
        "analysis_windows": 32,
        "variance_windows": 8,
        "recipe": {
            "dataset_name": str(SHARED / "data" / "c4-sample" / "c4_sample300.jsonl"),
            "dataset_format": "text",
            "eval_fraction": 0.1,
            "max_length": seq_len,
            "packing": True,
            # "wrapped": documents joined with EOS and cut into rows of [batch, max_length], every token used.
            # TRL's default "bfd" truncates long documents and flattens the batch into one padding-free row,
            # whose attention costs (batch x max_length)^2 without FlashAttention: ~8x slower on a CPU.
            "packing_strategy": "wrapped",
            "max_steps": steps,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1.0e-3,
            "lr_scheduler_type": "cosine_with_min_lr",
            "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
            "warmup_steps": max(1, steps // 10),
            "weight_decay": 0.0,
            "max_grad_norm": 0.0,
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "eval_strategy": "steps",
            "eval_steps": max(1, steps // 6),
            "logging_steps": max(1, steps // 30),
            "use_cpu": True,
            "bf16": False,
        },
        "variance_every": max(1, steps // 20),
    }


def paper_130m_preset(steps: int | None) -> dict:
    """The project's recipe for the paper's 130M run, with the model given by init instead of init_preset."""
    import yaml

    recipe = yaml.safe_load((REPO_ROOT / "recipes" / "scratch-130m.yaml").read_text(encoding="utf-8"))
    tokenizer = recipe.pop("tokenizer_name_or_path")
    model_preset = recipe.pop("init_preset")
    for key in ("init_lns", "output_dir"):
        recipe.pop(key, None)
    if steps:
        recipe["max_steps"] = steps
        recipe["warmup_steps"] = max(1, steps // 10)  # the paper's 2K of 20K
        recipe["eval_steps"] = max(1, steps // 10)
    return {
        "name": "130m",
        "model_preset": model_preset,
        "model_overrides": {},
        "tokenizer": tokenizer,
        "data": f"{recipe['dataset_name']}:{recipe['dataset_config']}",
        "data_split": recipe["dataset_test_split"],
        "seq_len": recipe["max_length"],
        "analysis_windows": 256,
        "variance_windows": 32,
        "recipe": recipe,
        "variance_every": max(1, recipe["max_steps"] // 100),  # 200 steps: Figure 3's first 2K steps get 10 points
    }


PRESETS = {"tiny": tiny_preset, "130m": paper_130m_preset}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per arm (default: tiny 300, 130m 20000); warm-up stays 10%%")
    parser.add_argument("--seed", type=int, default=42, help="init, data order and held-out split seed (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: out/reproduce-<preset>)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; on a busy machine 1 is often fastest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id instead of the preset's")
    parser.add_argument("--keep-models", action="store_true", help="keep both trained models under runs/<arm>/")
    return parser.parse_args(argv)


# --- measuring during training ------------------------------------------------------------------


def _variance_tracker(windows, every: int):
    """A TrainerCallback that records each block's output variance on ``windows`` every ``every`` steps."""
    from transformers import TrainerCallback

    from lns_surgery.analysis import depth_measures

    class VarianceTracker(TrainerCallback):
        def __init__(self):
            self.history: list[dict] = []

        def _measure(self, model, step: int) -> None:
            measured = depth_measures(model, windows, batch_size=8, removal=False)
            self.history.append({"step": step, "loss": measured["loss"], "embedding_variance": measured["variance"][0],
                                 "output_variance": measured["variance"][1:]})

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero:
                self._measure(model, state.global_step)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and state.global_step % every == 0:
                self._measure(model, state.global_step)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and (not self.history or self.history[-1]["step"] != state.global_step):
                self._measure(model, state.global_step)

    return VarianceTracker()


# --- the run -------------------------------------------------------------------------------------


def prepare_tokenizer(source: str, folder: Path) -> str:
    """The preset's tokenizer, saved to ``folder`` with GPT-2's special tokens named when the files
    leave them out (the shared GPT-2 folder has no tokenizer_config.json: no BOS/EOS, so documents
    could not be separated). Returns the folder."""
    from lns_surgery import load_tokenizer

    tokenizer = load_tokenizer(source)
    if tokenizer.eos_token is None and "<|endoftext|>" in tokenizer.get_vocab():
        tokenizer.bos_token = tokenizer.eos_token = tokenizer.unk_token = "<|endoftext|>"
    tokenizer.save_pretrained(folder)
    return str(folder)


def check_same_start(folders: list[Path]) -> None:
    """Both arms must start from identical weights (the LNS scale is not a parameter)."""
    from safetensors.torch import load_file

    from lns_surgery.core.errors import LNSError

    first, second = (load_file(str(folder / "model.safetensors")) for folder in folders)
    if first.keys() != second.keys() or any(not first[name].equal(second[name]) for name in first):
        raise LNSError("the Pre-LN and LNS models do not start from the same weights")


def _exp(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def eval_curve(log_history: list[dict]) -> list[dict]:
    by_step = {int(e["step"]): float(e["eval_loss"]) for e in log_history if "eval_loss" in e}
    return [{"step": step, "eval_loss": loss, "eval_perplexity": _exp(loss)} for step, loss in sorted(by_step.items())]


def held_out_windows(preset: dict, recipe: dict, tokenizer, count: int):
    """``count`` windows of held-out text: the run's own evaluation split (local file) or the
    dataset's validation split (Hub)."""
    from lns_surgery.analysis import token_windows
    from lns_surgery.training import data
    from lns_surgery.training.recipe import recipe_from_dict

    seq_len = preset["seq_len"]
    if preset["data_split"] is None:
        parsed = recipe_from_dict(recipe, "pretrain")
        _, evaluation = data.load_datasets(parsed.args, seed=parsed.training.seed)
        source = [text for text in evaluation["text"] if text.strip()]
    else:
        source = preset["data"]
    return token_windows(tokenizer, source, seq_len, count * seq_len, split=preset["data_split"] or "validation")


def run(preset: dict, seed: int, out: Path, *, overwrite: bool = False, keep_models: bool = False) -> dict:
    import gc

    from lns_surgery import load_tokenizer
    from lns_surgery.analysis import analyze_model
    from lns_surgery.analysis.report import build_report, write_outputs
    from lns_surgery.core.errors import LNSError
    from lns_surgery.core.outputs import atomic_output_dir, check_output
    from lns_surgery.training.models import init_model
    from lns_surgery.training.run import train_from_dict

    check_output(out, overwrite)
    if preset["data_split"] is None and not Path(preset["data"]).exists():
        raise LNSError(f"the {preset['name']} preset reads ../shared; '{preset['data']}' not found (set LNS_SHARED_DIR)")
    started = time.time()
    arms, analysed = {}, []
    with atomic_output_dir(out, overwrite) as staging, tempfile.TemporaryDirectory(prefix="lns-reproduce-") as scratch:
        scratch = Path(scratch)
        tokenizer_dir = prepare_tokenizer(preset["tokenizer"], scratch / "tokenizer")
        tokenizer = load_tokenizer(tokenizer_dir)
        # no intermediate checkpoints: this script does not resume (for a resumable 130M run, train
        # recipes/scratch-130m.yaml with `lns-surgery pretrain --resume`)
        common = {**preset["recipe"], "seed": seed, "data_seed": seed, "save_strategy": "no", "report_to": "none",
                  "activation_checkpointing": False, "overwrite": True}
        variance_windows = held_out_windows(preset, common, tokenizer, preset["variance_windows"])
        analysis_windows = held_out_windows(preset, common, tokenizer, preset["analysis_windows"])

        starts = {}
        for arm, lns in ARMS.items():
            starts[arm] = init_model(preset["model_preset"], scratch / f"init-{arm}", lns=lns, tokenizer=tokenizer_dir,
                                     config=preset["model_overrides"], seed=seed)
        check_same_start(list(starts.values()))

        for arm, lns in ARMS.items():
            print(f"\n== {arm}: {preset['recipe']['max_steps']} steps from scratch", flush=True)
            tracker = _variance_tracker(variance_windows, preset["variance_every"])
            output_dir = (staging if keep_models else scratch) / "runs" / arm
            recipe = {**common, "model_name_or_path": str(starts[arm]), "output_dir": str(output_dir)}
            result = train_from_dict(recipe, command="pretrain", callbacks=[tracker])
            metrics = result.metrics
            curve = eval_curve(metrics["log_history"])
            arms[arm] = {
                "lns": lns,
                "eval_curve": curve,
                "final_eval_loss": metrics["eval"]["eval_loss"],
                "final_eval_perplexity": metrics["eval"]["eval_perplexity"],
                "train_loss_curve": [{"step": int(e["step"]), "loss": float(e["loss"])} for e in metrics["log_history"]
                                     if "loss" in e and "step" in e],
                "tokens_seen": metrics["train"]["tokens_seen"],
                "train_runtime_seconds": metrics["train"].get("train_runtime"),
                "variance_history": tracker.history,
            }
            analysed.append(analyze_model(result.model, analysis_windows, name=arm))
            if not keep_models:
                kept = staging / "runs" / arm
                kept.mkdir(parents=True)
                for name in ("metrics.json", "recipe.yaml"):
                    shutil.copy2(result.output_dir / name, kept / name)
            del result
            gc.collect()

        tokens = {entry["tokens_seen"] for entry in arms.values()}
        if len(tokens) != 1:
            raise LNSError(f"the arms saw different numbers of tokens ({sorted(tokens)}); the comparison would be unfair")
        report = build_report(analysed, {"source": f"held-out {preset['data']}", "max_tokens": analysis_windows.numel(),
                                         "seq_len": preset["seq_len"], "batch_size": 8, "last_token": False,
                                         "text_field": "text", "split": preset["data_split"] or "held-out",
                                         "tasks": None, "tasks_limit": None})
        (staging / "depth").mkdir()
        write_outputs(report, staging / "depth")
        model_config = json.loads((starts["lns"] / "config.json").read_text(encoding="utf-8"))
        results = {
            "study": "reproduce-paper",
            "preset": preset["name"],
            "seed": seed,
            "model": {key: model_config[key] for key in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                        "num_attention_heads", "vocab_size", "initializer_range",
                                                        "tie_word_embeddings", "rms_norm_eps")},
            "parameters": report["models"][0]["num_parameters"],
            "tokenizer": preset["tokenizer"],
            "data": preset["data"],
            "training": {key: value for key, value in common.items() if key not in ("overwrite",)},
            "variance_every": preset["variance_every"],
            "variance_windows": list(variance_windows.shape),
            "analysis_windows": list(analysis_windows.shape),
            "tokens_per_arm": tokens.pop(),
            "arms": arms,
            "depth": {entry["name"]: depth_entry(entry) for entry in report["models"]},
            "paper": PAPER,
            "wall_seconds": round(time.time() - started, 1),
        }
        results["comparison"] = comparison(results)
        (staging / "results.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        write_plots(results, staging)
        (staging / "summary.md").write_text(summary_markdown(results), encoding="utf-8")
    return results


def depth_entry(entry: dict) -> dict:
    return {
        "perplexity": entry["perplexity"],
        "output_variance": [layer["output_variance"] for layer in entry["layers"]],
        "angular_distance_next": [layer["angular_distance_next"] for layer in entry["layers"]],
        "angular_distance": entry["angular_distance"],
        "removal_loss_increase": [layer["removal_loss_increase"] for layer in entry["layers"]],
    }



def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def comparison(results: dict) -> dict:
    """The paper's three claims, measured: lower perplexity, bounded variance, deep layers that matter."""
    arms, depth = results["arms"], results["depth"]
    pre, lns = arms["pre-ln"]["final_eval_perplexity"], arms["lns"]["final_eval_perplexity"]
    paper = PAPER["perplexity"]
    count = len(depth["lns"]["removal_loss_increase"])
    half = count // 2

    def deep_share(name):  # share of the summed removal damage that falls on the deeper half of the blocks
        values = [max(v or 0.0, 0.0) for v in depth[name]["removal_loss_increase"]]
        return sum(values[half:]) / sum(values) if sum(values) > 0 else math.nan

    def peak_last_variance(name):
        return max(point["output_variance"][-1] for point in arms[name]["variance_history"])

    return {
        "perplexity": {"pre-ln": pre, "lns": lns, "lns_vs_pre_ln_percent": 100.0 * (lns / pre - 1.0),
                       "paper_lns_vs_pre_ln_percent": 100.0 * (paper["lns"] / paper["pre-ln"] - 1.0),
                       "lns_lower": lns < pre},
        "last_block_output_variance": {
            "final": {name: depth[name]["output_variance"][-1] for name in ARMS},
            "peak_during_training": {name: peak_last_variance(name) for name in ARMS},
        },
        "deep_half_share_of_removal_loss": {name: deep_share(name) for name in ARMS},
        "mean_angular_distance_next": {
            "shallow_half": {name: _mean(depth[name]["angular_distance_next"][:half]) for name in ARMS},
            "deep_half": {name: _mean(depth[name]["angular_distance_next"][half:]) for name in ARMS},
        },
    }




def write_plots(results: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    arms = results["arms"]
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for arm, entry in arms.items():
        steps = [p["step"] for p in entry["eval_curve"]]
        axes.plot(steps, [p["eval_perplexity"] for p in entry["eval_curve"]], marker="o", markersize=3,
                  label=f"{arm} (final {entry['final_eval_perplexity']:.2f})")
    log_axis(axes)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("held-out perplexity")
    axes.set_title(f"From scratch, preset {results['preset']}: {results['tokens_per_arm']:,} tokens per arm, seed {results['seed']}",
                   fontsize=10)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / "eval_perplexity.png", dpi=120)
    plt.close(figure)

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colormap = plt.get_cmap("viridis")
    for axes, (arm, entry) in zip(panels, arms.items()):
        history = entry["variance_history"]
        steps = [point["step"] for point in history]
        count = len(history[0]["output_variance"])
        for index in range(count):
            axes.plot(steps, [point["output_variance"][index] for point in history], color=colormap(index / max(1, count - 1)),
                      linewidth=1.2, label=f"block {index + 1}" if index in (0, count // 2, count - 1) else None)
        log_axis(axes)
        axes.set_title(f"{arm}: output variance after each block", fontsize=10)
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=8)
    panels[0].set_ylabel("variance of the residual stream")
    figure.tight_layout()
    figure.savefig(folder / "variance_through_training.png", dpi=120)
    plt.close(figure)


def summary_markdown(results: dict) -> str:
    arms, depth, comp, training = results["arms"], results["depth"], results["comparison"], results["training"]
    model = results["model"]
    ppl = comp["perplexity"]
    lines = [f"# Pre-LN vs LayerNorm Scaling from scratch: preset `{results['preset']}`", ""]
    lines.append(
        f"LLaMA, {model['num_hidden_layers']} layers, width {model['hidden_size']}, SwiGLU {model['intermediate_size']}, "
        f"{model['num_attention_heads']} heads, vocabulary {model['vocab_size']} ({results['parameters'] / 1e6:.1f}M parameters), "
        f"normal init std {model['initializer_range']}. {training['max_steps']} steps x "
        f"{training['per_device_train_batch_size'] * training.get('gradient_accumulation_steps', 1)} sequences x "
        f"{training['max_length']} tokens = {results['tokens_per_arm']:,} tokens per arm, same order, seed {results['seed']}; "
        f"lr {training['learning_rate']:g}, {training['warmup_steps']} warm-up steps, {training['lr_scheduler_type']}. "
        f"Data: `{results['data']}`.")
    verdict = "lower" if ppl["lns_lower"] else "higher"
    lines += ["", f"**Final held-out perplexity: Pre-LN {ppl['pre-ln']:.2f}, LNS {ppl['lns']:.2f} "
              f"({ppl['lns_vs_pre_ln_percent']:+.1f}%: LNS {verdict}).** The paper's LLaMA-130M on C4: Pre-LN 26.73, "
              f"LNS 25.76 ({ppl['paper_lns_vs_pre_ln_percent']:+.1f}%).", ""]

    variance = comp["last_block_output_variance"]
    share = comp["deep_half_share_of_removal_loss"]
    angular = comp["mean_angular_distance_next"]
    rows = [
        ["final perplexity", ppl["pre-ln"], ppl["lns"], "26.73", "25.76"],
        ["last block output variance, peak during training", variance["peak_during_training"]["pre-ln"],
         variance["peak_during_training"]["lns"], "~175", "~25"],
        ["last block output variance, end", variance["final"]["pre-ln"], variance["final"]["lns"], "", ""],
        ["share of the removal loss on the deeper half of the blocks", f"{share['pre-ln']:.0%}", f"{share['lns']:.0%}", "", ""],
        ["mean angular distance input -> output, deeper half", angular["deep_half"]["pre-ln"], angular["deep_half"]["lns"], "", ""],
    ]
    lines += table(["", "Pre-LN", "LNS", "paper 130M, Pre-LN", "paper 130M, LNS"], rows)

    lns_curve = {p["step"]: p["eval_perplexity"] for p in arms["lns"]["eval_curve"]}
    rows = [[point["step"], point["eval_perplexity"], lns_curve.get(point["step"])] for point in arms["pre-ln"]["eval_curve"]]
    lines += ["", "## Held-out perplexity by step", "", *table(["step", "Pre-LN", "LNS"], rows)]

    rows = [[index + 1] + [depth[arm][measure][index] for measure in ("output_variance", "angular_distance_next",
                                                                      "removal_loss_increase") for arm in ("pre-ln", "lns")]
            for index in range(model["num_hidden_layers"])]
    lines += ["", "## Per block at the end", "",
              *table(["block", "variance Pre-LN", "variance LNS", "angular dist. Pre-LN", "angular dist. LNS",
                      "removal Δloss Pre-LN", "removal Δloss LNS"], rows)]
    lines += ["", "Removal Δloss: loss increase (nats/token) on held-out windows when the block is bypassed. "
              "Angular distance: arccos(cos)/pi between a block's input and output, mean over tokens.", "",
              "![held-out perplexity](eval_perplexity.png)", "", "![variance](variance_through_training.png)", "",
              "Full depth report, with angular-distance heatmaps: [depth/summary.md](depth/summary.md).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up temporary folders
    from lns_surgery.core.errors import LNSError

    out = args.out or Path("out") / f"reproduce-{args.preset}"
    try:
        if args.steps is not None and args.steps < 1:
            raise LNSError("--steps must be at least 1")
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.preset == "130m" and not torch.cuda.is_available():
            raise LNSError("the 130m preset trains 2.6B tokens per arm: it needs a CUDA GPU (use --preset tiny on a CPU)")
        preset = PRESETS[args.preset](args.steps)
        if args.tokenizer:
            preset["tokenizer"] = args.tokenizer
        results = run(preset, args.seed, out, overwrite=args.overwrite, keep_models=args.keep_models)
    except LNSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ppl = results["comparison"]["perplexity"]
    print(f"\nfinal held-out perplexity: Pre-LN {ppl['pre-ln']:.2f}, LNS {ppl['lns']:.2f} ({ppl['lns_vs_pre_ln_percent']:+.1f}%); "
          f"paper 130M: 26.73 vs 25.76 ({ppl['paper_lns_vs_pre_ln_percent']:+.1f}%)")
    print(f"wrote {out} ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
