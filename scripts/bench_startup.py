"""The fixed start-up of one ``lns-surgery convert``: this checkout against a baseline revision.

Converts a tiny Llama checkpoint (so the copy costs nothing) in fresh processes, alternating between
this working tree and a temporary ``git worktree`` of ``--baseline``, and reports the median of each
and their difference: what a change adds to every conversion before any weight is touched (importing
the family's modelling code, tracing it and proving its norms, which every conversion does).

    python scripts/bench_startup.py --baseline <git revision> [--repeats 5] [--out bench_results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _convert_seconds(root: Path, source: Path, out: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lns_surgery", "convert", str(source), "--out", str(out)],
                   check=True, env=env, cwd=root, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "startup.json")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="lns-bench-startup-") as work:
        work = Path(work)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(work / "tiny")
        baseline = work / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(baseline), args.baseline], check=True)
        try:
            _convert_seconds(REPO, work / "tiny", work / "warm-up")  # the first run fills the OS file cache
            runs = {"baseline": baseline, "this": REPO}
            seconds = {name: [] for name in runs}
            for repeat in range(args.repeats):
                for name, root in runs.items():
                    seconds[name].append(_convert_seconds(root, work / "tiny", work / f"{name}-{repeat}"))
                    print(f"  repeat {repeat + 1}: {name:8s} {seconds[name][-1]:.2f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], check=False)
    result = {"baseline": args.baseline, "seconds": seconds,
              "median_s": {name: statistics.median(values) for name, values in seconds.items()}}
    median = result["median_s"]
    result["added_s"] = median["this"] - median["baseline"]
    print(f"start-up at {args.baseline}: {median['baseline']:.2f} s; this tree: {median['this']:.2f} s "
          f"({result['added_s']:+.2f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
