"""The architecture registry: reviewed layouts of the model families supported by name.

The knowledge is data (``architectures.json``, shipped with the package): a default layout and, per
family, only what differs from it. This module loads and validates it. The stock classes come from
the installed transformers' auto mappings, so a family this transformers does not have is left out;
how each norm computes is proven on the model at conversion time, never stored.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources

from lns_surgery.core.errors import LNSError
from lns_surgery.modeling.lns_layers import NORM_KINDS, canonical_kind

AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForSequenceClassification")
GENERATIVE_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText")  # the first one present is built


def primary_auto_class(classes: dict) -> str | None:
    """The Auto class a checkpoint of this family is built and named with (causal LM, else image-text)."""
    return next((auto for auto in GENERATIVE_AUTO_CLASSES if auto in classes), None)


@dataclass(frozen=True)
class Architecture:
    """Where the two pre-sublayer norms of one ``model_type`` live, and what they compute."""

    model_type: str
    layers: str = ""
    norms: tuple[str, ...] = ()
    norm_kind: str = ""
    classes: dict = field(default_factory=dict)  # "config" and Auto class name -> stock class name
    refuse: str | None = None  # why this architecture cannot be converted
    detected: bool = False  # found by inspection rather than read from the registry
    untraceable: str | None = None  # why the layout is trusted although tracing cannot confirm it
    moe_norms: tuple[str, ...] = ()  # the norms of the family's mixture-of-experts variant, if it has other ones
    fold_rule: str | None = None  # how the scale folds into the norm weights (proven on the model), if it can
    norm_classes: tuple[str, ...] = ()  # the norm classes the form and the fold rule were proven on

    @property
    def primary_class(self) -> str:
        return self.classes[primary_auto_class(self.classes)]

    def __post_init__(self):
        if self.refuse:
            return
        problems = []
        if not self.layers:
            problems.append("'layers' is empty")
        if len(self.norms) < 1 or len(set(self.norms)) != len(self.norms):
            problems.append(f"'norms' must name distinct norms, got {list(self.norms)}")
        if self.norm_kind and canonical_kind(self.norm_kind) not in NORM_KINDS:
            problems.append(f"'norm_kind' {self.norm_kind!r} is not one of {', '.join(NORM_KINDS)}")
        if "config" not in self.classes or primary_auto_class(self.classes) is None:
            problems.append("'classes' must name at least 'config' and 'AutoModelForCausalLM' or 'AutoModelForImageTextToText'")
        unknown = set(self.classes) - {"config", *AUTO_CLASSES}
        if unknown:
            problems.append(f"'classes' has unknown keys {sorted(unknown)}")
        if problems:
            raise ValueError(f"architecture {self.model_type!r}: " + "; ".join(problems))

    def lns_block(self, alpha: float = 1.0, source: dict | None = None, tool_version: str | None = None) -> dict:
        """The ``lns`` block of an LNS checkpoint's config.json."""
        from lns_surgery.modeling.lns_layers import RULE, SCHEMA_VERSION

        return {
            "schema_version": SCHEMA_VERSION,
            "rule": RULE,
            "alpha": float(alpha),
            "base_model_type": self.model_type,
            "layers": self.layers,
            "norms": list(self.norms),
            "norm_kind": self.norm_kind,
            "fold_rule": self.fold_rule,
            "base_classes": dict(self.classes),
            "source": source or {},
            "tool_version": tool_version or _tool_version(),
        }


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lns-surgery")
    except PackageNotFoundError:
        return "unknown"


def classes_for_type(model_type: str) -> dict:
    """``{"config": ..., Auto class: stock class}`` from the installed transformers' auto mappings."""
    from transformers.models.auto import configuration_auto, modeling_auto

    mappings = {
        "AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
        "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "AutoModelForImageTextToText": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    }
    if model_type not in configuration_auto.CONFIG_MAPPING_NAMES:
        return {}
    classes = {"config": configuration_auto.CONFIG_MAPPING_NAMES[model_type]}
    classes.update({auto: names[model_type] for auto, names in mappings.items() if model_type in names})
    return classes


def parse_registry(document: dict) -> dict[str, Architecture]:
    """Validate a registry document and keep what the installed transformers can build."""
    if document.get("schema_version") != 2 or not isinstance(document.get("architectures"), dict):
        raise ValueError("architecture registry: expected schema_version 2 and an 'architectures' mapping")
    default = document.get("default", {})
    registry = {}
    for model_type, entry in document["architectures"].items():
        allowed = {"layers", "norms", "moe_norms", "refuse", "untraceable"}
        if not isinstance(entry, dict) or set(entry) - allowed:
            raise ValueError(f"architecture {model_type!r}: unknown keys {sorted(set(entry) - allowed)}")
        if "refuse" in entry:
            registry[model_type] = Architecture(model_type=model_type, refuse=entry["refuse"])
            continue
        classes = classes_for_type(model_type)
        if primary_auto_class(classes) is None:
            continue  # this transformers does not have the family
        registry[model_type] = Architecture(
            model_type=model_type,
            layers=entry.get("layers", default.get("layers", "")),
            norms=tuple(entry.get("norms", default.get("norms", ()))),
            classes=classes,
            untraceable=entry.get("untraceable"),
            moe_norms=tuple(entry.get("moe_norms", ())),
        )
    return registry


def _registry_document() -> dict:
    text = resources.files("lns_surgery.conversion").joinpath("architectures.json").read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def load_registry() -> dict[str, Architecture]:
    return parse_registry(_registry_document())


def supported_architectures() -> list[Architecture]:
    return [arch for arch in load_registry().values() if not arch.refuse]


def register_auto_classes() -> None:
    """Register the LNS classes of every architecture in the registry (``lns_llama``, ``lns_qwen2``, ...)."""
    from lns_surgery.modeling.auto import register

    for arch in supported_architectures():
        register(arch.lns_block())


def lookup(model_type: str) -> Architecture | None:
    """The registry entry for ``model_type``; raises for architectures that must be refused."""
    arch = load_registry().get(model_type)
    if arch is not None and arch.refuse:
        raise LNSError(f"cannot apply LayerNorm Scaling to '{model_type}': {arch.refuse}")
    return arch


def architecture_table(plain: bool = False) -> str:
    """The registry as the Markdown table of docs/architectures.md (or aligned plain text)."""
    rows = []
    for model_type, arch in load_registry().items():
        if arch.refuse:
            rows.append((model_type, "-", "-", "refused: " + arch.refuse))
        else:
            note = "not traceable: " + arch.untraceable if arch.untraceable else ""
            if arch.moe_norms:
                note = "mixture-of-experts variant: " + ", ".join(arch.moe_norms)
            rows.append((model_type, arch.layers, ", ".join(arch.norms), note))
    header = ("model_type", "layers", "scaled norms", "note")
    if plain:
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
        return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths)), row[3]]).rstrip() for row in [header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"`{cell}`" if i < 3 and cell != "-" else cell for i, cell in enumerate(row)) + " |" for row in rows]
    return "\n".join(lines)
