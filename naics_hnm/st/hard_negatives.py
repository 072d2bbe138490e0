"""``mine_hard_negatives``: a drop-in for ``sentence_transformers.util.mine_hard_negatives`` (same parameters,
defaults, output columns and formats); what differs is the table in ``docs/sentence_transformers.md``."""

from __future__ import annotations

import inspect
import logging
import math
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from naics_hnm.index.ids import DEVICES
from naics_hnm.st.cross_encoder_rescoring import check_cross_encoder, rescore_with_cross_encoder
from naics_hnm.st.dataset_card import PYTHON_API, card_record, render_card
from naics_hnm.st.distributed_mining import build_index
from naics_hnm.st.negative_search import SearchRequest, TextTree, search_negatives, text_codes
from naics_hnm.st.text_corpus import (DOCUMENT, QUERY, TextPairs, as_output, collect_pairs, embed_pairs, empty_columns,
                                      output_columns, resolved_prompt)
from naics_hnm.tree.guard import TreeGuard
from naics_hnm.tree.taxonomy import Taxonomy

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")
STRATEGIES = ("top", "random")
_SCORE_OPTIONS = ("max_score", "min_score", "absolute_margin", "relative_margin")


def mine_hard_negatives(
    dataset: Any, model: Any, anchor_column_name: str | None = None, positive_column_name: str | None = None,
    corpus: list[str] | None = None, cross_encoder: Any = None, range_min: int = 0, range_max: int | None = None,
    max_score: float | None = None, min_score: float | None = None, absolute_margin: float | None = None,
    relative_margin: float | None = None, num_negatives: int = 3, sampling_strategy: Literal["random", "top"] = "top",
    query_prompt_name: str | None = None, query_prompt: str | None = None, corpus_prompt_name: str | None = None,
    corpus_prompt: str | None = None, include_positives: bool = False,
    output_format: Literal["triplet", "n-tuple", "labeled-pair", "labeled-list"] = "triplet",
    output_scores: bool = False, batch_size: int = 32, faiss_batch_size: int = 16384, use_faiss: bool = False,
    use_multi_process: list[str] | bool = False, verbose: bool = True, cache_folder: str | None = None,
    as_triplets: bool | None = None, margin: float | None = None, *, seed: int | None = 0,
    taxonomy: Taxonomy | str | Path | None = None, codes: Mapping[str, str | Sequence[str]] | None = None,
    order_filter: bool = False, index_factory: str | None = None, search_params: dict[str, int] | None = None,
    device: str = "auto",
) -> Any:
    """Add mined negatives to a dataset of (anchor, positive) text pairs.

    The parameters up to ``margin`` are sentence-transformers', with the same defaults and output (``dataset``
    may also be a dict of text columns; the output is then a dict of columns). ``use_faiss`` is ignored (the
    search is exact unless ``index_factory`` is given). A ``cross_encoder``'s scores rank the candidates and
    feed the margins and ``max_score`` / ``min_score``, as in sentence-transformers 6.3. Extras, keyword-only:

    Args:
        seed: key of the draws of ``sampling_strategy="random"`` (None: a fresh seed, logged).
        taxonomy: a :class:`~naics_hnm.tree.taxonomy.Taxonomy` or its CSV path: each text stands for the
            codes whose title it equals (or those ``codes`` gives it) and the tree guard applies.
        codes: text -> code (or list of codes) of ``taxonomy``, for texts that are not titles.
        order_filter: with ``taxonomy``, also drop texts whose lowest common ancestor with the
            anchor is at least as deep as that of its farthest positive.
        index_factory, search_params: a faiss factory string (``"IVF4096,Flat"``) and its search parameters;
            None is the exact flat index.
        device: where the index lives: ``"auto"`` (GPU with a faiss GPU build), ``"cpu"``, ``"cuda"``.
    """
    options = dict(locals())
    dataset, model = options.pop("dataset"), options.pop("model")
    return mine_with_report(dataset, model, **options)[0]


@dataclass
class MiningReport:
    """What a run did: sizes, short rows and why, the scores written, seconds per step."""

    rows_in: int
    anchors: int
    corpus_texts: int
    texts_embedded: int
    num_negatives: int
    range_max: int
    seed: int
    rows_out: int
    short_anchors: int      # anchors with fewer than num_negatives negatives, the whole corpus searched
    short_rows: int         # their (anchor, positive) pairs
    dropped_rows: int       # (anchor, positive) pairs absent from the output
    positive_scores: np.ndarray
    negative_scores: np.ndarray
    removed: dict[str, int]
    short_removed: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    pairs_rescored: int = 0  # distinct (anchor, text) pairs the cross-encoder scored
    card_record: dict[str, Any] = field(default_factory=dict)  # naics_hnm.st.dataset_card's record of the run

    def counts(self) -> dict[str, Any]:
        """What the dataset card counts."""
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "anchors": self.anchors,
                "corpus_texts": self.corpus_texts, "texts_embedded": self.texts_embedded,
                "pairs_rescored": self.pairs_rescored, "short_anchors": self.short_anchors,
                "short_rows": self.short_rows, "dropped_rows": self.dropped_rows,
                "removed": dict(self.removed), "removed_in_short_rows": dict(self.short_removed)}

    def card(self, command: str = PYTHON_API) -> str:
        """The dataset card (YAML front matter + Markdown), with ``command`` as the way it was run."""
        return render_card({**self.card_record, "command": command})

    def score_table(self) -> list[str]:
        lines = [f"{'score':<6} {'positive':>10} {'negative':>10}"]
        stats = [("count", len), ("mean", np.mean), ("std", np.std), ("min", np.min),
                 ("25%", lambda x: np.quantile(x, 0.25)), ("50%", np.median),
                 ("75%", lambda x: np.quantile(x, 0.75)), ("max", np.max)]
        for name, fn in stats:
            cells = [(f"{fn(x):,}" if name == "count" else f"{fn(x):.4f}") if x.size else "-"
                     for x in (self.positive_scores, self.negative_scores)]
            lines.append(f"{name:<6} {cells[0]:>10} {cells[1]:>10}")
        return lines

    def short_message(self, hint: str = "") -> str:
        """One sentence on the short rows and why ('' when there are none)."""
        if not self.short_anchors:
            return ""
        reasons = ", ".join(f"{name.replace('_', ' ')} {count:,}" for name, count in self.short_removed.items()
                            if count)
        return (f"{self.short_anchors:,} of {self.anchors:,} anchors ({self.short_rows:,} rows) have fewer than "
                f"{self.num_negatives} valid negatives in the whole corpus of {self.corpus_texts:,} texts; "
                f"their candidates were removed as: {reasons or 'none (the corpus is too small)'}"
                + (f"; to find more, relax {hint}" if hint else "")
                + (f"; {self.dropped_rows:,} rows are left out of the output" if self.dropped_rows else ""))


def mine_with_report(dataset: Any, model: Any, *, shard: Any = None, **options: Any) -> tuple[Any, MiningReport]:
    """:func:`mine_hard_negatives` (``options`` are its parameters by name) plus a :class:`MiningReport`; with a
    ``shard`` (:func:`naics_hnm.st.distributed_mining.process_group_shard`) call it on every rank with the same
    arguments (every rank returns the same result)."""
    defaults = _defaults()
    unknown = sorted(options.keys() - defaults.keys())
    if unknown:
        raise TypeError(f"unexpected option(s) {unknown}; expected parameters of mine_hard_negatives")
    s = _validate(model, {**defaults, **options})
    clock, seconds = time.perf_counter(), {}

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step], clock = now - clock, now

    pairs = collect_pairs(dataset, s["anchor_column_name"], s["positive_column_name"], s["corpus"])
    empty_columns(pairs.anchor_column, pairs.positive_column, s["output_format"], s["output_scores"],
                  s["num_negatives"])  # a column clash fails before any work
    max_positives = int(pairs.positives_per_anchor.max())
    if s["cross_encoder"] is not None:  # sentence-transformers sizes its window by rows per anchor, repeats included
        max_positives = max(Counter(dataset[pairs.anchor_column]).values())
    range_max = _range_max(s, max_positives)
    tree = _text_tree(pairs, s) if s["taxonomy"] is not None else None
    corpus_vectors, queries, embedded = embed_pairs(
        model, pairs, (s["query_prompt"], s["query_prompt_name"]), (s["corpus_prompt"], s["corpus_prompt_name"]),
        batch_size=s["batch_size"], progress=s["verbose"], cache_folder=s["cache_folder"],
        use_multi_process=s["use_multi_process"], shard=shard)
    lap("embed")
    index = build_index(corpus_vectors, shard, device=s["device"], index_factory=s["index_factory"],
                        search_params=s["search_params"], seed=s["seed"])
    vectors = index.vectors.numpy() if index.device == "cpu" else corpus_vectors  # the scores faiss sees
    anchor_of = np.repeat(np.arange(len(pairs.anchors)), pairs.positives_per_anchor)
    positive_scores = np.einsum("pd,pd->p", queries[anchor_of], vectors[pairs.pos_ids]).astype(np.float32)
    lap("index")
    request = SearchRequest(
        index=index, queries=queries, self_ids=pairs.self_ids, pos_offsets=pairs.pos_offsets, pos_ids=pairs.pos_ids,
        positive_scores=positive_scores, keys=pairs.text_keys(), num_negatives=s["num_negatives"],
        range_min=s["range_min"], range_max=range_max, strategy=s["sampling_strategy"], seed=s["seed"],
        include_positives=s["include_positives"], tree=tree, batch_size=s["faiss_batch_size"],
        **{name: s[name] for name in _SCORE_OPTIONS})
    rescored = 0
    if s["cross_encoder"] is None:
        result = search_negatives(request, progress=s["verbose"])
        lap("search")
    else:
        result, positive_scores, rescored = rescore_with_cross_encoder(
            s["cross_encoder"], pairs, request, range_max + max_positives + 1,  # sentence-transformers' window
            batch_size=s["batch_size"], progress=s["verbose"], use_multi_process=s["use_multi_process"], shard=shard)
        lap("rescore")
    rows = output_columns(pairs, result.ids, result.scores, positive_scores, s["output_format"], s["output_scores"],
                          s["num_negatives"])
    output = as_output(rows.columns, dataset)
    lap("output")
    short = result.found < s["num_negatives"]
    report = MiningReport(
        rows_in=pairs.rows, anchors=len(pairs.anchors), corpus_texts=len(pairs.corpus), texts_embedded=embedded,
        num_negatives=s["num_negatives"], range_max=range_max, seed=s["seed"], short_anchors=int(short.sum()),
        rows_out=len(rows.columns[pairs.anchor_column]), short_rows=int(pairs.positives_per_anchor[short].sum()),
        dropped_rows=rows.dropped_rows, positive_scores=rows.positive_scores, negative_scores=rows.negative_scores,
        removed=result.removed, short_removed=result.short_removed, seconds=seconds, pairs_rescored=rescored)
    report.card_record = card_record(
        {**s, "range_max": range_max}, report.counts(), model=model, cross_encoder=s["cross_encoder"],
        taxonomy=s["taxonomy"], codes=s["codes"], corpus_size=None if s["corpus"] is None else len(s["corpus"]))
    if hasattr(output, "info"):  # a Dataset carries its card (save_to_disk keeps it in dataset_info.json)
        output.info.description = report.card()
    _log(report, s)
    return output, report


def _log(report: MiningReport, s: dict[str, Any]) -> None:
    if s["verbose"]:
        logger.info("mined %s rows from %s input rows (%s anchors, %s corpus texts, %s texts embedded) in %.2fs",
                    f"{report.rows_out:,}", f"{report.rows_in:,}", f"{report.anchors:,}", f"{report.corpus_texts:,}",
                    f"{report.texts_embedded:,}", sum(report.seconds.values()))
        for line in report.score_table():
            logger.info(line)
        for name, count in report.removed.items():
            if count and name in _SCORE_OPTIONS + ("related", "order"):
                logger.info("skipped %s candidates for %s", f"{count:,}", name.replace("_", " "))
    knobs = [name for name in _SCORE_OPTIONS if s[name] is not None]
    knobs += ["range_min"] * bool(s["range_min"]) + ["order_filter"] * bool(s["order_filter"])
    message = report.short_message(", ".join(knobs))
    if message:
        logger.warning(message)


def _range_max(s: dict[str, Any], max_positives: int) -> int:
    """sentence-transformers' default: room for the positives, and 10x the negatives under filters."""
    if s["range_max"] is not None:
        return s["range_max"]
    filtered = any(s[name] is not None for name in ("absolute_margin", "relative_margin", "max_score"))
    filtered |= s["cross_encoder"] is not None and s["min_score"] is not None  # as sentence-transformers 6.3
    return s["range_min"] + s["num_negatives"] * (10 if filtered else 1) + max_positives


def _text_tree(pairs: TextPairs, s: dict[str, Any]) -> TextTree:
    taxonomy = s["taxonomy"]
    corpus_codes = text_codes(pairs.corpus, taxonomy, s["codes"])
    anchor_codes = text_codes(pairs.anchors, taxonomy, s["codes"])
    mapped = [int((table >= 0).any(axis=1).sum()) for table in (corpus_codes, anchor_codes)]
    (logger.warning if mapped[1] == 0 else logger.info)(
        "tree guard: %d of %d corpus texts and %d of %d anchor texts stand for codes of taxonomy %r",
        mapped[0], len(pairs.corpus), mapped[1], len(pairs.anchors), taxonomy.name)
    return TextTree(TreeGuard(taxonomy), corpus_codes, anchor_codes, order_filter=s["order_filter"])


def check_options(**options: Any) -> None:
    """ValueError / TypeError naming the bad option, for :func:`mine_hard_negatives`' options that need no model."""
    _check_values({**_defaults(), **options})


def _defaults() -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(mine_hard_negatives).parameters.items()
            if name not in ("dataset", "model")}


def _validate(model: Any, o: dict[str, Any]) -> dict[str, Any]:
    """Checked options (ValueError / TypeError naming the value and the expected form)."""
    if not callable(getattr(model, "encode", None)):
        raise TypeError(f"model must have encode(list[str]) -> array [n, d] (e.g. a SentenceTransformer), "
                        f"got {type(model).__name__}")
    _check_values(o)
    _check_multi_process(model, o["use_multi_process"])
    resolved_prompt(model, QUERY, o["query_prompt"], o["query_prompt_name"])  # unknown prompt names fail now
    resolved_prompt(model, DOCUMENT, o["corpus_prompt"], o["corpus_prompt_name"])
    if o["include_positives"]:
        if (o["range_min"] or o["range_max"] is not None or o["sampling_strategy"] != "top"
                or any(o[name] is not None for name in _SCORE_OPTIONS)):
            logger.warning("include_positives=True with range, score or margin settings or random sampling: "
                           "positives may still be left out of the candidates")
        if o["output_format"] != "n-tuple":
            logger.warning('include_positives=True: output_format set to "n-tuple" to keep the ranking order')
            o["output_format"] = "n-tuple"
    return o


def _check_values(o: dict[str, Any]) -> None:
    """The model-free checks of :func:`_validate`; pops the options that only sentence-transformers uses."""
    if o["cross_encoder"] is not None:
        check_cross_encoder(o["cross_encoder"])
    o.pop("use_faiss")  # no effect: the search is exact unless index_factory is given
    _deprecated(o)
    for name, allowed in (("output_format", OUTPUT_FORMATS), ("sampling_strategy", STRATEGIES), ("device", DEVICES)):
        if o[name] not in allowed:
            raise ValueError(f"{name}={o[name]!r}: expected one of {', '.join(repr(a) for a in allowed)}")
    for name, low in (("range_min", 0), ("num_negatives", 1), ("batch_size", 1), ("faiss_batch_size", 1)):
        _integer(o, name, low)
    if o["range_max"] is not None:
        _integer(o, "range_max", o["range_min"] + 1, f"range_min + 1 = {o['range_min'] + 1}")
        if o["num_negatives"] > o["range_max"] - o["range_min"]:
            raise ValueError(f"num_negatives={o['num_negatives']} does not fit between range_min={o['range_min']} "
                             f"and range_max={o['range_max']}; expected num_negatives <= range_max - range_min")
    for name in _SCORE_OPTIONS:
        value = o[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                  or not math.isfinite(value)):
            raise ValueError(f"{name}={value!r}: expected a finite number or None")
    if o["max_score"] is not None and o["min_score"] is not None and o["min_score"] > o["max_score"]:
        raise ValueError(f"min_score={o['min_score']} is above max_score={o['max_score']}; no candidate can pass")
    for name in ("include_positives", "output_scores", "verbose", "order_filter"):
        if not isinstance(o[name], (bool, np.bool_)):
            raise TypeError(f"{name}={o[name]!r}: expected True or False")
    for name in ("query_prompt_name", "query_prompt", "corpus_prompt_name", "corpus_prompt", "index_factory"):
        if o[name] is not None and not isinstance(o[name], str):
            raise TypeError(f"{name}={o[name]!r}: expected a string or None")
    if o["cache_folder"] is not None and not isinstance(o["cache_folder"], (str, os.PathLike)):
        raise TypeError(f"cache_folder={o['cache_folder']!r}: expected a folder path or None")
    if o["search_params"] is not None and not isinstance(o["search_params"], Mapping):
        raise TypeError(f"search_params={o['search_params']!r}: expected a dict such as {{'nprobe': 64}} or None")
    if o["seed"] is None:
        o["seed"] = secrets.randbits(62)
        if o["sampling_strategy"] == "random":
            logger.info("seed=None: drew seed=%d; pass it to draw the same negatives again", o["seed"])
    _integer(o, "seed", 0, "0 or None")
    _check_tree(o)


def _deprecated(o: dict[str, Any]) -> None:
    """sentence-transformers' deprecated spellings, mapped as it maps them."""
    as_triplets, margin = o.pop("as_triplets"), o.pop("margin")
    if as_triplets is not None:
        o["output_format"] = "triplet" if as_triplets else "n-tuple"
        logger.warning("as_triplets is deprecated; use output_format=%r", o["output_format"])
    if margin is not None:
        o["absolute_margin"] = margin
        logger.warning("margin is deprecated; use absolute_margin=%r (or relative_margin)", margin)
    if o["output_format"] == "n-tuple-scores":
        logger.warning('output_format="n-tuple-scores" is deprecated; use output_format="n-tuple", output_scores=True')
        o["output_format"], o["output_scores"] = "n-tuple", True


def _integer(o: dict[str, Any], name: str, low: int, low_text: str | None = None) -> None:
    value = o[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r}: expected an integer >= {low_text or low}")
    o[name] = int(value)


def _check_multi_process(model: Any, value: Any) -> None:
    if value is False:
        return
    if not (value is True or (isinstance(value, (list, tuple)) and all(isinstance(d, str) for d in value))):
        raise TypeError(f"use_multi_process={value!r}: expected a bool or a list of device names")
    if not callable(getattr(model, "start_multi_process_pool", None)):
        raise ValueError("use_multi_process needs a model with start_multi_process_pool() (a SentenceTransformer)")


def _check_tree(o: dict[str, Any]) -> None:
    taxonomy = o["taxonomy"]
    if isinstance(taxonomy, (str, os.PathLike)):
        o["taxonomy"] = taxonomy = Taxonomy.from_csv(taxonomy)
    if taxonomy is not None and not isinstance(taxonomy, Taxonomy):
        raise TypeError(f"taxonomy={type(taxonomy).__name__}: expected a Taxonomy, a taxonomy CSV path or None")
    if taxonomy is None and (o["codes"] is not None or o["order_filter"]):
        raise ValueError("codes= and order_filter=True need taxonomy= (the tree the codes belong to)")
