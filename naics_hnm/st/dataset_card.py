"""A dataset card for every mined output: a ``README.md`` in the Hugging Face dataset-card form (YAML front
matter with a ``naics_hnm`` record of how it was made, and a Markdown body); see ``docs/sentence_transformers.md``."""

from __future__ import annotations

import json
import logging
import math
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from naics_hnm.atomic import atomic_write_text
from naics_hnm.st.text_corpus import model_fingerprint

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
PYTHON_API = "python API"
_LIBRARIES = ("naics_hnm", "sentence-transformers", "torch", "faiss-cpu", "faiss-gpu-cu12", "transformers", "numpy",
              "datasets")
_OBJECTS = ("dataset", "model", "cross_encoder", "taxonomy", "codes", "corpus")


def model_identity(model: Any) -> dict[str, Any] | None:
    """``{class, name, fingerprint}`` of a model (None for None); the name is its path or hub id when known."""
    if model is None:
        return None
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "name": _model_name(model),
            "fingerprint": model_fingerprint(model)}


def _model_name(model: Any) -> str | None:
    for holder in (model, getattr(model, "model", None), getattr(model, "config", None),
                   getattr(getattr(model, "model", None), "config", None)):
        for attribute in ("name_or_path", "_name_or_path"):
            value = getattr(holder, attribute, None)
            if isinstance(value, str) and value:
                return value
    try:
        first = model[0]  # a SentenceTransformer: its Transformer module
    except (TypeError, IndexError, KeyError):
        return None
    config = getattr(getattr(first, "auto_model", None), "config", None)
    value = getattr(config, "_name_or_path", None)
    return value if isinstance(value, str) and value else None


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if "naics_hnm" not in versions:
        from naics_hnm import __version__
        versions["naics_hnm"] = __version__
    return versions


def card_record(settings: Mapping[str, Any], counts: Mapping[str, Any], *, model: Any, cross_encoder: Any,
                taxonomy: Any, codes: Mapping[str, Any] | None, corpus_size: int | None,
                command: str = PYTHON_API) -> dict[str, Any]:
    """The ``naics_hnm`` record of the card (plain JSON / YAML values)."""
    tree = None
    if taxonomy is not None:
        tree = {"name": taxonomy.name, "codes": len(taxonomy.codes), "fingerprint": taxonomy.fingerprint,
                "guard": "never a text of an ancestor or a descendant of the anchor's codes",
                "order_filter": bool(settings.get("order_filter")),
                "codes_mapping": None if codes is None else len(codes)}
    return {"model": model_identity(model), "cross_encoder": model_identity(cross_encoder),
            "settings": {name: _plain(value) for name, value in settings.items() if name not in _OBJECTS},
            "corpus": {"extra_texts": corpus_size}, "taxonomy": tree,
            "counts": {name: _plain(value) for name, value in counts.items()},
            "versions": library_versions(), "command": command}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _size_category(rows: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if rows < bound:
            return label
    return "10M<n<100M"


def _yaml(data: Mapping[str, Any]) -> str:
    try:
        import yaml
    except ImportError:  # JSON is YAML: readable by any YAML parser, only less pretty
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, width=120)


def render_card(record: Mapping[str, Any]) -> str:
    """The card: YAML front matter (Hub dataset-card keys + the record) and a Markdown body."""
    counts, settings = record["counts"], record["settings"]
    front = {"tags": ["sentence-transformers", "hard-negatives", "naics_hnm"],
             "task_categories": ["sentence-similarity"],
             "size_categories": [_size_category(int(counts.get("rows_out") or 0))],
             "naics_hnm": dict(record)}
    lines = ["---", _yaml(front).rstrip("\n"), "---", "", "# Mined hard negatives", "",
             f"(anchor, positive) pairs with hard negatives mined by `naics_hnm.mine_hard_negatives` "
             f"(a drop-in for `sentence_transformers.util.mine_hard_negatives`), output format "
             f"`{settings.get('output_format')}`.", "", "## How it was made", "", "| | |", "|---|---|"]
    for label in ("model", "cross_encoder"):
        ident = record.get(label)
        lines.append(f"| {label.replace('_', '-')} | " + (
            f"`{ident['name'] or '?'}` ({ident['class']}), fingerprint `{(ident['fingerprint'] or '-')[:16]}`"
            if ident else "none") + " |")
    tree = record.get("taxonomy")
    lines.append("| taxonomy | " + (f"`{tree['name']}`, {tree['codes']:,} codes, fingerprint "
                                     f"`{tree['fingerprint'][:16]}`, order_filter={tree['order_filter']}"
                                     if tree else "none (no tree guard)") + " |")
    lines.append(f"| command | `{record['command']}` |")
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{name}` | `{json.dumps(value)}` |" for name, value in settings.items()]
    lines += ["", "## Counts", "", "| count | value |", "|---|---|"]
    for name, value in counts.items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k} {v:,}" for k, v in value.items() if v) or "none"
        elif isinstance(value, int):
            value = f"{value:,}"
        lines.append(f"| {name.replace('_', ' ')} | {value} |")
    lines += ["", "## Library versions", "", ", ".join(f"{k} {v}" for k, v in record["versions"].items()), "",
              "The YAML front matter holds all of the above under `naics_hnm`.", ""]
    return "\n".join(lines)


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The front matter of a card file as a dict (yaml, else JSON front matter)."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError(f"{os.fspath(path)!r} has no YAML front matter; expected a card that starts with '---'")
    block = text[4 : text.index("\n---\n", 4)]
    try:
        import yaml
    except ImportError:
        return json.loads(block)
    return yaml.safe_load(block)


def card_path_for(output: str | os.PathLike) -> Path:
    """Where the card of ``output`` goes: ``README.md`` in a folder, ``<name>.README.md`` beside a file."""
    output = Path(output)
    if output.is_dir() or not output.suffix:
        return output / CARD_NAME
    return output.with_name(f"{output.name}.{CARD_NAME}")


def write_dataset_card(card: Any, output: str | os.PathLike) -> Path:
    """Write ``card`` (the text, or a mined ``Dataset`` carrying it) for ``output`` (a folder or a data file);
    returns the card's path (:func:`card_path_for`)."""
    if not isinstance(card, str):
        description = getattr(getattr(card, "info", None), "description", None)
        if not isinstance(description, str) or not description.startswith("---"):
            raise ValueError(f"write_dataset_card: {type(card).__name__} carries no card; expected the card text or "
                             "a Dataset returned by naics_hnm.mine_hard_negatives")
        card = description
    path = card_path_for(output)
    atomic_write_text(path, card)
    logger.info("wrote the dataset card %s", path)
    return path
