"""embed_codes: order, distinct-text sharing, eval mode restored, clear errors."""

from __future__ import annotations

import pytest
import torch

from naics_hnm.embedding import distinct_token_rows, embed_codes
from naics_hnm.train.encoder import TINY_BERT, NAICSEncoder
from naics_hnm.data.token_cache import TokenCache


def _cache() -> TokenCache:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 9, (30,), generator=g)
    ids = torch.randint(1000, 1100, (30, 9), generator=g)
    ids = torch.where(torch.arange(9)[None, :] < lengths[:, None], ids, torch.zeros_like(ids))
    ids[7], lengths[7] = ids[3], lengths[3]  # codes 3, 7 and 11 share their text
    ids[11], lengths[11] = ids[3], lengths[3]
    return TokenCache(ids, lengths)


def test_rows_come_back_in_the_order_of_ids_and_shared_texts_are_embedded_once():
    cache = _cache()
    model = NAICSEncoder(config=TINY_BERT).train()
    calls = []

    def embed(tokens):
        calls.append(len(tokens["input_ids"]))
        return model.embed(tokens)

    ids = torch.tensor([11, 0, 29, 3, 7, 5, 0])
    out = embed_codes(embed, cache, ids, batch_size=4, module=model)
    assert model.training  # restored
    assert sum(calls) == 4  # 11, 3 and 7 share one row; 0 is asked twice
    model.eval()
    with torch.no_grad():
        for row, code in enumerate(ids.tolist()):
            expected = model.embed(cache.gather(torch.tensor([code])))[0]
            assert torch.allclose(out[row], expected, atol=1e-5)
    distinct, slot = distinct_token_rows(cache, ids)
    assert distinct.tolist() == [11, 0, 29, 5] and slot.tolist() == [0, 1, 2, 0, 0, 3, 1]


def test_errors_name_the_problem():
    cache = _cache()
    cache.present[4] = False
    model = NAICSEncoder(config=TINY_BERT)
    with pytest.raises(ValueError, match="code index 4"):
        embed_codes(model.embed, cache, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="batch_size=0"):
        embed_codes(model.embed, cache, batch_size=0)
    with pytest.raises(ValueError, match=r"expected \[2, d\]"):
        embed_codes(lambda tokens: torch.zeros(3), cache, torch.tensor([1, 2]))
