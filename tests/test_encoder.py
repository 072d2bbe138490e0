"""The reference encoder: embed() contract, frozen-prefix cache, InfoNCE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from naics_hnm.train.encoder import TINY_BERT, NAICSEncoder
from naics_hnm.train.losses import info_nce
from naics_hnm.data.token_cache import TokenCache


@pytest.fixture(scope="module")
def cache() -> TokenCache:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 12, (40,), generator=g)
    ids = torch.randint(1000, 2000, (40, 12), generator=g)
    ids[:, 0] = 101
    ids = torch.where(torch.arange(12)[None, :] < lengths[:, None], ids, torch.zeros_like(ids))
    return TokenCache(ids, lengths)


def test_embed_is_unit_norm_and_ignores_padding(cache):
    model = NAICSEncoder(config=TINY_BERT).eval()
    tokens = cache.gather(torch.arange(10))
    out = model.embed(tokens)
    assert out.shape == (10, TINY_BERT["hidden_size"])
    assert torch.allclose(out.norm(dim=1), torch.ones(10), atol=1e-5)
    wider = cache.gather(torch.arange(10), width=12)
    assert torch.allclose(model.embed(wider), out, atol=1e-5)
    nested = {k: v.reshape(2, 5, -1) for k, v in tokens.items()}
    assert torch.allclose(model.embed(nested).reshape(10, -1), out, atol=1e-6)


def test_frozen_prefix_cache_equals_full_forward(cache):
    torch.manual_seed(0)
    model = NAICSEncoder(config=TINY_BERT, freeze_layers=1).eval()
    full = model.embed(cache.gather(torch.arange(40))).detach()
    model.cache_frozen_prefix(cache)
    assert model._prefix is not None
    ids = torch.tensor([5, 3, 3, 39, 0])
    tokens = cache.gather(ids)
    rows = model._prefix.lookup(tokens["input_ids"], tokens["attention_mask"])
    assert rows.tolist() == ids.tolist()
    assert torch.allclose(model.embed(tokens), full[ids], atol=1e-5)
    # a token row that is not a cached code falls back to the full forward pass
    unknown = {k: v.clone() for k, v in tokens.items()}
    unknown["input_ids"][0, 1] = 7
    assert model._prefix.lookup(unknown["input_ids"], unknown["attention_mask"])[0] == -1
    reference = NAICSEncoder(config=TINY_BERT, freeze_layers=1)
    reference.load_state_dict(model.state_dict())
    assert torch.allclose(model.embed(unknown), reference.eval().embed(unknown), atol=1e-6)


def test_fully_frozen_head_uses_pooled_outputs_from_a_file(cache, tmp_path, caplog):
    torch.manual_seed(0)
    model = NAICSEncoder(config=TINY_BERT, freeze_layers=2, head="mlp").eval()
    with torch.no_grad():  # a head that is not the identity, so the test sees it
        model.head.down.weight.normal_(0, 0.1)
    full = model.embed(cache.gather(torch.arange(40))).detach()
    token_file = tmp_path / "tokens_x_0123.h5"
    model.cache_frozen_prefix(cache, batch_size=7, token_cache_path=str(token_file))
    assert model._prefix.pooled is not None and model._prefix.states is None
    written = list(tmp_path.glob("tokens_x_0123.frozen-*.npy"))
    assert len(written) == 1
    ids = torch.tensor([5, 3, 3, 39, 0])
    assert torch.allclose(model.embed(cache.gather(ids)), full[ids], atol=1e-5)
    # the pooled outputs come back from the file (another head, same frozen weights: same file)
    other = NAICSEncoder(config=TINY_BERT, freeze_layers=2, head="mlp").eval()
    other.encoder.load_state_dict(model.encoder.state_dict())
    other.head.load_state_dict(model.head.state_dict())
    with caplog.at_level("INFO", logger="naics_hnm.train.frozen_prefix"):
        other.cache_frozen_prefix(cache, token_cache_path=str(token_file))
    assert "read from" in caplog.text
    assert torch.equal(other._prefix.pooled, model._prefix.pooled)
    assert torch.allclose(other.embed(cache.gather(ids)), full[ids], atol=1e-5)
    # other frozen weights are another file, never a stale read
    changed = NAICSEncoder(config=TINY_BERT, freeze_layers=2, head="mlp").eval()
    changed.cache_frozen_prefix(cache, token_cache_path=str(token_file))
    assert len(list(tmp_path.glob("tokens_x_0123.frozen-*.npy"))) == 2
    assert not torch.equal(changed._prefix.pooled, model._prefix.pooled)


def test_head_trains_while_every_layer_is_frozen(cache):
    model = NAICSEncoder(config=TINY_BERT, freeze_layers=2, head="mlp").train()
    model.cache_frozen_prefix(cache)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("head.") for name in trainable)
    model.embed(cache.gather(torch.arange(8))).sum().backward()
    assert model.head.down.weight.grad.abs().sum() > 0


def test_frozen_layers_stay_in_eval_and_get_no_gradient(cache):
    model = NAICSEncoder(config=TINY_BERT, freeze_layers=1).train()
    layers = model.encoder.encoder.layer
    assert not layers[0].training and layers[1].training
    model.embed(cache.gather(torch.arange(8))).sum().backward()
    assert layers[0].attention.self.query.weight.grad is None
    assert layers[1].attention.self.query.weight.grad.abs().sum() > 0


def test_constructor_errors():
    with pytest.raises(ValueError, match="freeze_layers=5"):
        NAICSEncoder(config=TINY_BERT, freeze_layers=5)
    with pytest.raises(ValueError, match="model_type"):
        NAICSEncoder(config={"hidden_size": 8})
    with pytest.raises(ValueError, match="freeze_layers=2 freezes every layer"):
        NAICSEncoder(config=TINY_BERT, freeze_layers=2)
    with pytest.raises(ValueError, match="head='linear'"):
        NAICSEncoder(config=TINY_BERT, head="linear")
    with pytest.raises(ValueError, match="temperature=0"):
        NAICSEncoder(config=TINY_BERT, temperature=0)


def test_info_nce_matches_a_hand_computed_softmax():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    p = F.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0]]), dim=1)
    n = F.normalize(torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [5.0, 5.0]]]), dim=2)
    mask = torch.tensor([[True, True], [True, False]])
    tau = 0.5
    expected = 0.0
    for b in range(2):
        logits = [float(a[b] @ p[b]) / tau] + [float(a[b] @ n[b, j]) / tau for j in range(2) if mask[b, j]]
        expected += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    loss = info_nce(a, p, n, mask, temperature=tau)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)
    # masked negatives do not count: changing the padded vector leaves the loss unchanged
    n2 = n.clone()
    n2[1, 1] = torch.tensor([0.0, 1.0])
    assert info_nce(a, p, n2, mask, temperature=tau).item() == pytest.approx(loss.item())


def test_in_batch_negatives_are_guarded_by_the_taxonomy():
    from naics_hnm.tree.taxonomy import Taxonomy

    tx = Taxonomy.naics2022()
    model = NAICSEncoder(config=TINY_BERT, in_batch_negatives=True)
    model.set_taxonomy(tx)
    rng = torch.Generator().manual_seed(0)
    anchors = torch.tensor([tx.index(c) for c in ("111110", "311111", "445110", "5415")])
    positives = torch.tensor([int(tx.parent[a]) for a in anchors])
    negatives = torch.randint(0, len(tx), (4, 3), generator=rng)
    negatives[1, 0] = tx.index("311119")  # a sibling: as near as the positive
    mask = torch.tensor([[True, True, False]] * 4)
    batch = {"anchor_idx": anchors, "positive_idx": positives, "negative_idx": negatives, "negative_mask": mask}
    ids = torch.cat([anchors, positives, negatives[mask]])
    unique, inverse = torch.unique(ids, return_inverse=True)
    allowed = model._in_batch_allowed(batch, unique, inverse)
    for r, (a, p) in enumerate(zip(anchors.tolist(), positives.tolist())):
        own = set(negatives[r][mask[r]].tolist())
        related = {a, *tx.ancestors(a).tolist(), *tx.descendants(a).tolist()}
        for j, u in enumerate(unique.tolist()):
            expected = u not in related and u != p and u not in own and tx.lca_depth(a, u) < tx.lca_depth(a, p)
            assert bool(allowed[r, j]) == expected, (tx.codes[a], tx.codes[u])


def test_dropout_override_makes_training_mode_deterministic(cache):
    tokens = cache.gather(torch.arange(6))
    model = NAICSEncoder(config=TINY_BERT, dropout=0.0)
    assert torch.equal(model.train().embed(tokens), model.eval().embed(tokens))
    noisy = NAICSEncoder(config={**TINY_BERT, "hidden_dropout_prob": 0.5})
    assert not torch.equal(noisy.train().embed(tokens), noisy.eval().embed(tokens))
    with pytest.raises(ValueError, match="dropout=1.5"):
        NAICSEncoder(config=TINY_BERT, dropout=1.5)
