"""Depth diagnostics: does every block pull its weight? (``lns-surgery analyze``)

Measures from "The Curse of Depth in Large Language Models" (Sun et al., 2025), per block, for any
stock, LNS or folded checkpoint: the residual stream's output variance, what each sublayer adds,
the angular distance between block inputs, and the perplexity with each block removed (bypassed in
one process, never saved and reloaded).

- ``analyze(models, data, out, ...)``: models on disk or in memory -> report folder; returns the report.
- ``analyze_model(model, windows_or_tokenizer, data=None, ...)``: one model in memory -> its report
  entry, without writing anything.
- ``token_windows(tokenizer, data, seq_len, max_tokens)``, ``depth_measures(model, windows)``,
  ``skip_blocks(model, indices)`` (a context manager), ``evaluate_nll(model, windows)``.

The report.json schema is documented in ``lns_surgery.analysis.report``.
"""

from __future__ import annotations

from lns_surgery._lazy import lazy_exports

_API = {
    "analyze": "lns_surgery.analysis.run",
    "analyze_model": "lns_surgery.analysis.run",
    "token_windows": "lns_surgery.analysis.data",
    "iter_documents": "lns_surgery.analysis.data",
    "depth_measures": "lns_surgery.analysis.measures",
    "skip_blocks": "lns_surgery.analysis.measures",
    "evaluate_nll": "lns_surgery.analysis.measures",
    "block_layout": "lns_surgery.analysis.measures",
    "summary_markdown": "lns_surgery.analysis.report",
    "write_plots": "lns_surgery.analysis.plots",
}

__all__ = sorted(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API, globals())
