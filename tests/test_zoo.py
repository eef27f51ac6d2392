"""The whole zoo: every causal-LM and image-text-to-text ``model_type`` of the installed transformers.

Each tiny model (tests/zoo_models.py) is saved, converted in code mode and in fold mode, loaded back
(code mode through the checkpoint's own code, fold mode as the stock class) and compared with an
independent reference: the stock model with forward hooks that multiply the outputs of the norms
named in ``zoo_expectations.json`` by 1/sqrt(l). The expectations file is the reviewed record of
every outcome: exact (with the block list, the scaled norms and whether folding is possible), or
refused (with the reason), or not buildable tiny (zoo_models.UNBUILDABLE). Any change of outcome
fails; refresh the file (and the table in docs/architectures.md) with ``python tests/test_zoo.py --write [model_type ...]``
and review the diff.

A type that a newer transformers adds has no record yet: it is converted and checked all the same
(exact against the reference built from the norms the conversion chose, or refused in one line) and
reported as a warning, so upstream growth fails the suite only where a conversion is wrong or crashes.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from lns_reference import hooked_layout

import zoo_models

EXPECTATIONS = Path(__file__).with_name("zoo_expectations.json")
TOLERANCE = 1e-4  # fp32 logits; code mode is usually bit-exact, folding rounds the norm weights once
ACTIVE = 1e-4  # the scaling must move the logits by more than this


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


def hooked_logits(model, layers: str, norms, inputs) -> torch.Tensor:
    """The reference: block l's named norms have their outputs multiplied by 1/sqrt(l)."""
    with hooked_layout(model, layers, norms):
        return _logits(model, inputs)


def convert_one(model_type: str, workdir: Path) -> dict:
    """Convert one tiny model both ways; the outcome, and the logits of everything that loaded."""
    import transformers

    import lns_surgery

    stock, auto_name = zoo_models.build_tiny(model_type)
    stock.save_pretrained(workdir / "stock")
    auto = getattr(transformers, auto_name)
    try:
        lns_surgery.convert(workdir / "stock", workdir / "lns")
    except lns_surgery.LNSError as exc:
        return {"outcome": "refused", "reason": str(exc)}
    lns = json.loads((workdir / "lns" / "config.json").read_text())["lns"]
    outcome = {"outcome": "exact", "layers": lns["layers"], "norms": lns["norms"]}
    loaded = {"code": auto.from_pretrained(workdir / "lns", trust_remote_code=True, dtype=torch.float32).eval()}
    try:
        lns_surgery.convert(workdir / "stock", workdir / "folded", mode="fold")
        loaded["fold"] = auto.from_pretrained(workdir / "folded", dtype=torch.float32).eval()
    except lns_surgery.LNSError as exc:
        outcome["fold_refusal"] = str(exc)
    outcome["fold"] = "fold" in loaded
    return {**outcome, "stock": stock, "auto": auto_name, "loaded": loaded}


def _recorded(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in {"stock", "auto", "loaded"}}


def _expectations() -> dict:
    return json.loads(EXPECTATIONS.read_text()) if EXPECTATIONS.exists() else {}


BUILDABLE = [t for t in zoo_models.ZOO_TYPES if t not in zoo_models.UNBUILDABLE]


class UnrecordedModelType(UserWarning):
    """A model type of the installed transformers that zoo_expectations.json does not record yet."""


def test_unbuildable_types_say_why_and_unrecorded_ones_are_reported():
    missing = sorted(set(BUILDABLE) - set(_expectations()))
    if missing:  # each is still converted and checked by test_zoo_type_is_exact_or_refused_as_recorded
        warnings.warn(UnrecordedModelType(
            f"transformers {transformers_version()} adds {len(missing)} model type(s) with no recorded outcome: "
            f"{', '.join(missing)}; record them with python tests/test_zoo.py --write {' '.join(missing)}"))
    assert all(reason.strip() for reason in zoo_models.UNBUILDABLE.values())
    assert zoo_counts()["exact"] > 0


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def zoo_counts() -> dict:
    counts = {"exact": 0, "refused": 0}
    for record in _expectations().values():
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    return {**counts, "not buildable": len(zoo_models.UNBUILDABLE), "types": len(zoo_models.ZOO_TYPES)}


@pytest.mark.parametrize("model_type", BUILDABLE)
def test_zoo_type_is_exact_or_refused_as_recorded(model_type, tmp_path):
    expected = _expectations().get(model_type)
    result = convert_one(model_type, tmp_path)
    if expected is None:  # a type newer than the record: checked against what the conversion chose, and reported
        expected = _recorded(result)
        warnings.warn(UnrecordedModelType(f"{model_type} (not recorded): {result['outcome']}"
                                          + (f", {result['reason']}" if "reason" in result else
                                             f", {result['layers']}: {', '.join(result['norms'])}")))
    assert _recorded(result) == expected
    if result["outcome"] != "exact":
        assert "\n" not in result["reason"]  # one readable line
        return
    stock = result["stock"]
    runs = [zoo_models.make_inputs(stock, result["auto"])]
    image = zoo_models.make_inputs(stock, result["auto"], with_image=True)
    if image is not None:
        runs.append(image)
    # The stock checkpoint itself must load back as the model that wrote it, or nothing can be compared.
    reloaded = getattr(__import__("transformers"), result["auto"]).from_pretrained(tmp_path / "stock", dtype=torch.float32).eval()
    assert torch.equal(_logits(reloaded, runs[0]), _logits(stock, runs[0])), "the stock save/load round trip changes the model"
    for inputs in runs:
        base = _logits(stock, inputs)
        reference = hooked_logits(stock, expected["layers"], expected["norms"], inputs)
        assert (reference - base).abs().max().item() > ACTIVE, "the scaling must be active"
        for mode, model in result["loaded"].items():
            diff = (_logits(model, inputs) - reference).abs().max().item()
            assert diff <= TOLERANCE, f"{mode} mode differs from the reference by {diff:.3g}"
    assert set(result["loaded"]) == ({"code", "fold"} if expected["fold"] else {"code"})


def test_an_unrecorded_type_is_checked_and_reported(tmp_path, monkeypatch):
    recorded = _expectations()
    monkeypatch.setitem(globals(), "_expectations", lambda: {k: v for k, v in recorded.items() if k != "llama"})
    with pytest.warns(UnrecordedModelType, match="llama .not recorded.: exact, model.layers"):
        test_zoo_type_is_exact_or_refused_as_recorded("llama", tmp_path)


def zoo_table() -> str:
    """The README's per-family results: how each family is converted (from the registry or from its
    data flow; code and fold mode, or code only) or why it is refused, from the recorded outcomes."""
    from lns_surgery.conversion.registry import load_registry

    registry = load_registry()
    rows = ["| model_type | layout from | layers | scaled norms | modes |", "|---|---|---|---|---|"]
    refused = ["| model_type | why it is refused |", "|---|---|"]
    for model_type, record in sorted(_expectations().items()):
        if record["outcome"] == "exact":
            origin = "registry" if model_type in registry else "data flow"
            modes = "code, fold" if record["fold"] else "code only"
            rows.append(f"| `{model_type}` | {origin} | `{record['layers']}` | {', '.join(record['norms'])} | {modes} |")
        else:
            refused.append(f"| `{model_type}` | {record['reason'].replace('|', '/')} |")
    unbuildable = ", ".join(f"`{name}`" for name in sorted(zoo_models.UNBUILDABLE))
    return "\n".join([*rows, "", "Refused, each with its one-line reason:", "", *refused, "",
                      f"Not testable tiny here ({len(zoo_models.UNBUILDABLE)}): {unbuildable}."])


def test_readme_zoo_table_is_current():
    readme = (Path(__file__).parent.parent / "docs" / "architectures.md").read_text()
    start, end = readme.index("<!-- zoo:start -->"), readme.index("<!-- zoo:end -->")
    assert readme[start:end].split("\n", 1)[1].strip() == zoo_table().strip(), (
        "docs/architectures.md zoo table is stale: regenerate it with python tests/test_zoo.py --readme"
    )


def write_readme_table() -> None:
    path = Path(__file__).parent.parent / "docs" / "architectures.md"
    readme = path.read_text()
    start, end = readme.index("<!-- zoo:start -->"), readme.index("<!-- zoo:end -->")
    path.write_text(readme[:start] + "<!-- zoo:start -->\n" + zoo_table() + "\n" + readme[end:])


def write_expectations(only=()) -> None:
    """Record the current outcome of every buildable type, or of ``only`` (review the diff before committing it)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    recorded = {key: value for key, value in _expectations().items() if key in BUILDABLE} if only else {}
    for model_type in only or BUILDABLE:
        with tempfile.TemporaryDirectory() as workdir:
            try:
                recorded[model_type] = _recorded(convert_one(model_type, Path(workdir)))
            except Exception as exc:  # a crash is recorded so the review sees it
                recorded[model_type] = {"outcome": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        print(model_type, recorded[model_type]["outcome"], recorded[model_type].get("reason", ""), flush=True)
    EXPECTATIONS.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:
        write_readme_table()
    elif sys.argv[1:2] == ["--write"]:
        write_expectations(sys.argv[2:])
        write_readme_table()
    else:
        sys.exit("usage: python tests/test_zoo.py --write [model_type ...] | --readme")
