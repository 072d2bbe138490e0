"""Mine hard negatives without a Trainer: NAICS 2022 titles, the offline MiniLM, one EmbeddingIndex.

    python examples/mine_standalone.py [--k 5] [--codes 311111 445110 541511]

For each anchor code it prints the k hardest negatives from the whole taxonomy, guarded (never
the code itself, its parent as positive, an ancestor or a descendant), with the positive-aware margin.
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from naics_hnm import EmbeddingIndex, NAICSEncoder, mine_candidates  # noqa: E402
from naics_hnm.embedding import embed_codes  # noqa: E402
from naics_hnm.tree.taxonomy import Taxonomy  # noqa: E402
from naics_hnm.data.token_cache import TokenCache, load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--codes", nargs="+", default=["311111", "445110", "541511", "111110"])
    parser.add_argument("--margin", type=float, default=0.05)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    taxonomy = Taxonomy.naics2022()
    cache = TokenCache.from_texts(taxonomy.texts, load_tokenizer(), max_length=32, codes=taxonomy.codes)
    model = NAICSEncoder()
    embeddings = embed_codes(model.embed, cache, module=model, progress=True)
    index = EmbeddingIndex.build(embeddings, metric="cosine", device="auto", codes=taxonomy.codes)

    anchors = taxonomy.indices(args.codes)
    positives = taxonomy.parent[anchors]
    scores, ids, stats = mine_candidates(index, anchors, None, k=args.k, positive_ids=positives,
                                         relative_margin=args.margin, taxonomy=taxonomy, return_stats=True)
    for row, anchor in enumerate(anchors):
        print(f"\n{taxonomy.codes[anchor]} {taxonomy.titles[anchor]!r} "
              f"(positive: {taxonomy.codes[positives[row]]} {taxonomy.titles[positives[row]]!r})")
        for score, code in zip(np.asarray(scores[row]), np.asarray(ids[row])):
            if code >= 0:
                print(f"  {score:.3f}  {taxonomy.codes[code]:>6}  {taxonomy.titles[code]}")
    print(f"\nguard: {stats}")


if __name__ == "__main__":
    main()
