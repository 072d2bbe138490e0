"""Embed every code with a model: eval mode, no grad, length-sorted batches, train mode restored."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from naics_hnm.data.token_cache import TokenCache
from naics_hnm.precision import embedding_autocast

EmbedFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module | None) -> Iterator[None]:
    """Switch ``module`` to eval mode for the block and restore its previous mode after."""
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if module is not None and was_training:
            module.train()


def length_order(token_cache: TokenCache, ids: torch.Tensor) -> torch.Tensor:
    """Permutation of ``ids`` by token length (longest first), so batches carry little padding."""
    return torch.argsort(token_cache.lengths[ids], descending=True, stable=True)


@torch.no_grad()
def embed_codes(embed_fn: EmbedFn, token_cache: TokenCache, ids: torch.Tensor | None = None, *,
                batch_size: int = 512, device: torch.device | str = "cpu", module: torch.nn.Module | None = None,
                progress: bool = False, desc: str = "embedding codes",
                dtype: torch.dtype = torch.float32, bf16: bool | None = None) -> torch.Tensor:
    """CPU ``dtype`` [len(ids), d] embeddings of ``ids`` (default: every code), in the order of ``ids``.

    Each distinct token sequence is embedded once, longest first, in batches of ``batch_size``, straight into one
    preallocated array. ``module`` (usually the LightningModule) is in eval mode meanwhile. On a CPU with native
    bf16 the passes run under bf16 autocast unless ``bf16=False`` (see :mod:`naics_hnm.precision`).
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
    ids = torch.arange(token_cache.size) if ids is None else torch.as_tensor(ids, dtype=torch.long).cpu()
    if len(ids) == 0:
        raise ValueError("embed_codes got no ids to embed")
    missing = ids[~token_cache.present[ids]]
    if len(missing):
        raise ValueError(f"embed_codes: no tokens for code index {int(missing[0])} ({len(missing)} missing)")
    distinct, slot = distinct_token_rows(token_cache, ids)
    by_slot = torch.argsort(slot, stable=True)
    bounds = torch.searchsorted(slot[by_slot], torch.arange(len(distinct) + 1))
    perm = length_order(token_cache, distinct)
    out: torch.Tensor | None = None
    with eval_mode(module), embedding_autocast(device, bf16):
        for start in tqdm(range(0, len(distinct), batch_size), desc=desc, disable=not progress, leave=False):
            rows = perm[start : start + batch_size]
            tokens = {k: v.to(device) for k, v in token_cache.gather(distinct[rows]).items()}
            emb = embed_fn(tokens)
            if emb.ndim != 2 or emb.shape[0] != len(rows):
                raise ValueError(f"embed function returned shape {tuple(emb.shape)}: expected [{len(rows)}, d]")
            if out is None:
                out = torch.empty(len(ids), emb.shape[1], dtype=dtype)
            counts = bounds[rows + 1] - bounds[rows]
            within = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
            positions = by_slot[torch.repeat_interleave(bounds[rows], counts) + within]
            out[positions] = emb.detach().to("cpu", dtype)[torch.repeat_interleave(torch.arange(len(rows)), counts)]
    assert out is not None
    return out


def distinct_token_rows(token_cache: TokenCache, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes with identical tokens embed identically: (one id per distinct token row, row of each id)."""
    table, lengths = token_cache._numpy()
    first: dict[bytes, int] = {}
    distinct: list[int] = []
    slot = np.empty(len(ids), dtype=np.int64)
    for position, code in enumerate(ids.tolist()):
        key = table[code, : lengths[code]].tobytes()
        row = first.get(key)
        if row is None:
            row = first[key] = len(distinct)
            distinct.append(code)
        slot[position] = row
    return torch.tensor(distinct, dtype=torch.long), torch.from_numpy(slot)
