"""The reference encoder: embed() contract, frozen-prefix cache, InfoNCE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from naics_hnm.train.encoder import TINY_BERT, NAICSEncoder
from naics_hnm.train.losses import info_nce, tree_listwise, tree_rings
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


def test_tree_listwise_matches_a_hand_computed_cross_entropy():
    g = torch.Generator().manual_seed(3)
    a = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    codes = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    lca = torch.tensor([[0, 2, 1, 3, 0], [1, 1, 0, 2, 4], [2, 0, 0, 1, 1]])
    same = torch.zeros(3, 5, dtype=torch.bool)
    same[0, 3] = same[2, 0] = True
    tau, beta = 0.1, 2.0
    expected = 0.0
    for b in range(3):
        cols = [j for j in range(5) if not same[b, j]]
        weights = [math.exp(beta * float(lca[b, j])) for j in cols]
        logits = [float(a[b] @ codes[j]) / tau for j in cols]
        log_norm = math.log(sum(math.exp(x) for x in logits))
        expected += -sum(w / sum(weights) * (x - log_norm) for w, x in zip(weights, logits))
    got = tree_listwise(a @ codes.T, lca, same, temperature=tau, sharpness=beta)
    assert got.item() == pytest.approx(expected / 3, rel=1e-5)
    with pytest.raises(ValueError, match="sharpness=0"):
        tree_listwise(a @ codes.T, lca, same, sharpness=0)


def test_tree_listwise_pulls_codes_in_order_of_their_common_ancestor_depth():
    """One gradient step on free vectors: the code sharing the deepest ancestor gains the most similarity."""
    g = torch.Generator().manual_seed(0)
    anchor = F.normalize(torch.randn(1, 8, generator=g), dim=1)
    basis, _ = torch.linalg.qr(torch.cat([anchor.T, torch.randn(8, 4, generator=g)], dim=1))
    sign = torch.sign(basis[:, :1].T @ anchor.T)  # qr may flip the first column
    orth = basis[:, 1:5].T  # 4 unit vectors orthogonal to the anchor
    codes = (0.1 * sign * basis[:, 0] + math.sqrt(0.99) * orth).requires_grad_(True)  # all at cosine 0.1
    lca = torch.tensor([[0, 1, 2, 3]])
    tree_listwise(anchor @ codes.T, lca, torch.zeros(1, 4, dtype=torch.bool), temperature=0.05).backward()
    moved = -(codes.grad @ anchor.T).squeeze(1)  # similarity change per unit step against the gradient
    assert moved.argsort().tolist() == [0, 1, 2, 3]
    assert moved[0] < 0 < moved[3]


@pytest.mark.parametrize("tau", [0.1, 0.005])  # 0.005: far levels sit ~400 nats below the row's maximum
def test_tree_rings_matches_a_brute_force_over_levels(tau):
    g = torch.Generator().manual_seed(5)
    a = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    codes = F.normalize(torch.randn(9, 6, generator=g), dim=1)
    lca = torch.randint(0, 4, (4, 9), generator=g)
    lca[3] = 2  # one ring only: no level of this anchor has codes further out, so it adds no term
    same = torch.zeros(4, 9, dtype=torch.bool)
    same[0, 2] = same[1, 7] = True
    terms = []
    for b in range(4):
        s = [float(a[b] @ codes[j]) / tau for j in range(9)]
        for t in range(1, 4):
            ring = [j for j in range(9) if lca[b, j] == t and not same[b, j]]
            inside = [j for j in range(9) if lca[b, j] <= t and not same[b, j]]
            if ring and len(inside) > len(ring):
                top = max(s[j] for j in inside)
                log_norm = top + math.log(sum(math.exp(s[j] - top) for j in inside))
                terms.append(-sum(s[j] - log_norm for j in ring) / len(ring))
    assert len(terms) >= 6
    got = tree_rings(a @ codes.T, lca, same, temperature=tau)
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    flat = tree_rings((a[3:] @ codes.T).requires_grad_(True), lca[3:], same[3:])
    assert flat.item() == 0.0 and flat.requires_grad  # nothing to contrast: zero, still part of the graph
    with pytest.raises(ValueError, match="temperature=0"):
        tree_rings(a @ codes.T, lca, same, temperature=0)


def test_tree_rings_gradient_is_finite_where_levels_are_missing():
    """Empty levels (no code at depth 0, 2 or 4 for some anchors) enter the normaliser as -inf; the gradient stays
    finite and equals that of a loop over the levels that are there."""
    sim = torch.tensor([[0.9, 0.8, 0.3, 0.2, 0.1, 0.0], [0.5, 0.4, 0.6, 0.1, 0.2, 0.3]], requires_grad=True)
    lca = torch.tensor([[1, 1, 3, 3, 5, 5], [2, 4, 4, 4, 2, 6]])
    same = torch.zeros(2, 6, dtype=torch.bool)
    tree_rings(sim, lca, same, temperature=0.1).backward()
    assert torch.isfinite(sim.grad).all()
    ref = sim.detach().clone().requires_grad_(True)
    terms = []
    for b in range(2):
        for t in sorted(set(lca[b].tolist()) - {0}):
            ring, inside = lca[b] == t, lca[b] <= t
            if bool((inside & ~ring).any()):
                row = ref[b] / 0.1
                terms.append(torch.logsumexp(row[inside], 0) - row[ring].mean())
    torch.stack(terms).mean().backward()
    assert torch.allclose(sim.grad, ref.grad, atol=1e-6)


def test_tree_rings_evens_out_a_ring_and_lifts_it_above_the_codes_further_out():
    """One gradient step on free vectors: within the ring the lower similarity gains, the higher one loses; the
    code outside the ring (a shallower common ancestor) loses most."""
    g = torch.Generator().manual_seed(1)
    anchor = F.normalize(torch.randn(1, 8, generator=g), dim=1)
    basis, _ = torch.linalg.qr(torch.cat([anchor.T, torch.randn(8, 3, generator=g)], dim=1))
    sign = torch.sign(basis[:, :1].T @ anchor.T)
    cosines = torch.tensor([0.2, 0.6, 0.5])  # ring codes at 0.2 and 0.6, the outside code at 0.5
    codes = (cosines[:, None] * sign * basis[:, 0] + (1 - cosines[:, None] ** 2).sqrt() * basis[:, 1:4].T)
    codes.requires_grad_(True)
    tree_rings(anchor @ codes.T, torch.tensor([[2, 2, 1]]), torch.zeros(1, 3, dtype=torch.bool), 0.1).backward()
    moved = -(codes.grad @ anchor.T).squeeze(1)
    assert moved[0] > 0 > moved[1]  # the ring evens out
    assert moved[2] < moved[1]  # the code further out is pushed down hardest


def test_the_tree_term_uses_the_guard_lca_of_each_anchor_and_batch_code():
    from naics_hnm.tree.taxonomy import Taxonomy

    tx = Taxonomy.naics2022()
    anchors = torch.tensor([tx.index(c) for c in ("111110", "311111", "445110")])
    positives = torch.tensor([int(tx.parent[a]) for a in anchors])
    negatives = torch.tensor([[tx.index("111120")], [tx.index("311119")], [tx.index("541511")]])
    batch = {"anchor_idx": anchors, "positive_idx": positives, "negative_idx": negatives,
             "negative_mask": torch.ones(3, 1, dtype=torch.bool)}
    torch.manual_seed(0)
    plain = NAICSEncoder(config=TINY_BERT, dropout=0.0)
    torch.manual_seed(0)
    tree = NAICSEncoder(config=TINY_BERT, dropout=0.0, tree_weight=0.5, tree_sharpness=2.0)
    tree.set_taxonomy(tx)
    emb, unique, inverse = tree._unique_embeddings(batch | _tokens(anchors, positives, negatives))
    lca = torch.tensor([[tx.lca_depth(int(a), int(u)) for u in unique] for a in anchors])
    extra = tree_listwise(emb[inverse[:3]] @ emb.T, lca, unique[None, :] == anchors[:, None], 0.05, 2.0)
    full = tree._loss(batch | _tokens(anchors, positives, negatives))
    base = plain._loss(batch | _tokens(anchors, positives, negatives))
    assert full.item() == pytest.approx(base.item() + 0.5 * extra.item(), rel=1e-5)
    with pytest.raises(ValueError, match="tree_weight=-1"):
        NAICSEncoder(config=TINY_BERT, tree_weight=-1)
    torch.manual_seed(0)
    rings = NAICSEncoder(config=TINY_BERT, dropout=0.0, tree_weight=0.5, tree_sharpness=2.0, ring_weight=2.0,
                         ring_temperature=0.2)
    rings.set_taxonomy(tx)
    ring_term = tree_rings(emb[inverse[:3]] @ emb.T, lca, unique[None, :] == anchors[:, None], 0.2)
    assert ring_term.item() > 0
    both = rings._loss(batch | _tokens(anchors, positives, negatives))
    assert both.item() == pytest.approx(full.item() + 2.0 * ring_term.item(), rel=1e-5)
    with pytest.raises(ValueError, match="ring_weight=-1"):
        NAICSEncoder(config=TINY_BERT, ring_weight=-1)
    with pytest.raises(ValueError, match="ring_temperature=0"):
        NAICSEncoder(config=TINY_BERT, ring_temperature=0)


def _tokens(*groups: torch.Tensor) -> dict:
    """Token rows for code ids (a code's id as its one word), shaped like the batch fields."""
    def rows(ids: torch.Tensor) -> dict:
        flat = ids.reshape(-1)
        input_ids = torch.stack([torch.tensor([101, 1000 + int(i) % 1000, 102]) for i in flat])
        shape = (*ids.shape, 3)
        return {"input_ids": input_ids.reshape(shape), "attention_mask": torch.ones(shape, dtype=torch.long)}
    anchors, positives, negatives = groups
    return {"anchor": rows(anchors), "positive": rows(positives), "negatives": rows(negatives)}
