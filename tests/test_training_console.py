"""What a training run prints: one short line per log entry instead of the Trainer's raw dicts."""

from __future__ import annotations

from lns_surgery.training.callbacks import compact_log_line


def test_a_training_log_is_one_short_line_with_the_figures_that_matter():
    logs = {"loss": 0.90431, "grad_norm": 0.3662, "learning_rate": 0.002721, "lns_alpha": 0.5, "entropy": 0.898,
            "num_tokens": 40960.0, "epoch": 0.2353, "num_input_tokens_seen": 40960, "train_runtime": 10.6}
    assert compact_log_line(logs, 20, 80) == "step 20/80: loss 0.9043, lns_alpha 0.5, learning_rate 0.002721, grad_norm 0.3662"


def test_evaluation_and_the_final_summary_read_as_such():
    assert compact_log_line({"eval_loss": 1.25, "eval_runtime": 3.0, "epoch": 1.0}, 40, 80) == "step 40/80: eval loss 1.25"
    summary = {"train_runtime": 42.69, "train_samples_per_second": 29.98, "train_loss": 0.92623, "epoch": 0.94}
    assert compact_log_line(summary, 80, 80) == "trained 80 steps in 42.7 s, mean loss 0.9262"
    assert compact_log_line({"epoch": 1.0, "num_input_tokens_seen": 10}, 3, 8) is None  # nothing worth a line
