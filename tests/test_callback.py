"""HardNegativeMiningCallback in a real Trainer with a tiny config-built encoder."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from naics_hnm import HardNegativeMiningCallback, NAICSDataModule
from naics_hnm.embedding import embed_codes
from naics_hnm.train.encoder import TINY_BERT, NAICSEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Recorder(NAICSEncoder):
    """The tiny encoder, recording what training_step receives."""

    def __init__(self, **kwargs):
        super().__init__(config=TINY_BERT, lr=1e-3, **kwargs)
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({"epoch": self.current_epoch,
                          **{k: batch[k].detach().clone() for k in
                             ("anchor_idx", "positive_idx", "negative_idx", "negative_mask", "candidate_idx")},
                          "negative_scores": batch.get("negative_scores"),
                          "negative_tokens": batch["negatives"]["input_ids"].clone()})
        return super().training_step(batch, batch_idx)


class EmbeddingSnapshots(Callback):
    """Independently re-embeds every code at each epoch start (after the mining callback ran)."""

    def __init__(self):
        self.by_epoch: dict[int, torch.Tensor] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        cache = trainer.datamodule.token_cache
        self.by_epoch[trainer.current_epoch] = embed_codes(pl_module.embed, cache, module=pl_module)


def _fit(tmp_path, *, max_epochs=3, callbacks=(), ckpt_path=None, phase1_end_epoch=1, seed=7, **dm_kwargs):
    pl.seed_everything(seed, workers=True)
    dm = NAICSDataModule(batch_size=32, num_workers=0, cache_dir=tmp_path / "cache", seed=seed,
                         phase1_end_epoch=phase1_end_epoch, pairs_per_epoch=96, **dm_kwargs)
    model = Recorder()
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, callbacks=list(callbacks),
                         default_root_dir=tmp_path, enable_checkpointing=any(
                             isinstance(c, ModelCheckpoint) for c in callbacks), deterministic=True)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, dm, trainer


TOL = 1e-5  # similarities closer than this may come out in either order under another BLAS kernel


def _check_selection(got, emb, tx, a, p, row, k, margin, order_filter):
    """``got`` is a correct choice of the k hardest in ``row`` up to near-ties (float64 reference).

    The guard and the order filter are exact; the margin threshold and the ranking are checked with
    :data:`TOL`: a candidate within TOL of the threshold may be in or out, and chosen and unchosen
    candidates within TOL of each other may swap (NAICS repeats titles, so many vectors are equal).
    """
    sims = emb[row[row >= 0]].astype(np.float64) @ emb[a].astype(np.float64)
    sim = dict(zip(row[row >= 0].tolist(), sims.tolist()))
    sim_p = float(emb[a].astype(np.float64) @ emb[p].astype(np.float64))
    banned = {a, p, *tx.ancestors(a).tolist(), *tx.descendants(a).tolist()}
    eligible = {c for c in sim if c not in banned and not (order_filter and tx.lca_depth(a, c) >= tx.lca_depth(a, p))}
    threshold = np.inf if margin is None else sim_p - margin * abs(sim_p)
    clear = {c for c in eligible if sim[c] < threshold - TOL}
    near = {c for c in eligible if abs(sim[c] - threshold) <= TOL}
    assert len(got) == len(set(got)) and set(got) <= clear | near
    assert min(k, len(clear)) <= len(got) <= min(k, len(clear) + len(near))
    chosen = [sim[c] for c in got]
    assert all(x >= y - TOL for x, y in zip(chosen, chosen[1:])), "hardest first"
    if got:
        assert max((sim[c] for c in clear - set(got)), default=-np.inf) <= min(chosen) + TOL


def test_phase_switch_refresh_count_and_brute_force_negatives(tmp_path):
    cb = HardNegativeMiningCallback(k=4, relative_margin=0.05, neighbours=16)
    snaps = EmbeddingSnapshots()
    model, dm, trainer = _fit(tmp_path, callbacks=[cb, snaps])
    assert cb.refresh_count == 2 and cb.last_refresh_epoch == 2
    tx = dm.taxonomy
    phase1 = [s for s in model.seen if s["epoch"] == 0]
    mined = [s for s in model.seen if s["epoch"] >= 1]
    assert phase1 and mined
    assert all(s["negative_scores"] is None for s in phase1)
    assert all(s["negative_idx"].shape[1] == dm.cfg.n_negatives for s in phase1)
    checked = 0
    for s in mined:
        emb = snaps.by_epoch[s["epoch"]].numpy()
        assert s["negative_idx"].shape[1] == 4
        for row, (a, p) in enumerate(zip(s["anchor_idx"].tolist(), s["positive_idx"].tolist())):
            got = [c for c in s["negative_idx"][row].tolist() if c >= 0]
            _check_selection(got, emb, tx, a, p, s["candidate_idx"][row].numpy(), 4, 0.05, True)
            assert s["negative_mask"][row].tolist() == [True] * len(got) + [False] * (4 - len(got))
            checked += 1
        # the pool shows the widening: each anchor's 16 nearest guarded codes are in it (up to near-ties)
        emb64 = emb.astype(np.float64)
        for row, a in enumerate(s["anchor_idx"].tolist()[:5]):
            banned = {a, *tx.ancestors(a).tolist(), *tx.descendants(a).tolist()}
            guarded = np.array([c for c in range(len(emb)) if c not in banned])
            sims = emb64[guarded] @ emb64[a]
            sixteenth = np.sort(sims)[::-1][15]
            assert set(guarded[sims > sixteenth + TOL].tolist()) <= set(s["candidate_idx"][row].tolist())
        # token rows follow the mined ids
        cache = dm.token_cache
        for row in range(3):
            for j, c in enumerate(s["negative_idx"][row].tolist()):
                if c >= 0:
                    n = int(cache.lengths[c])
                    assert torch.equal(s["negative_tokens"][row, j, :n], cache.input_ids[c, :n])
    assert checked > 100


def test_never_related_and_no_margin_or_order_filter(tmp_path):
    cb = HardNegativeMiningCallback(k=6, relative_margin=None, order_filter=False, neighbours=8)
    model, dm, _ = _fit(tmp_path, max_epochs=2, callbacks=[cb])
    tx = dm.taxonomy
    mined = [s for s in model.seen if s["epoch"] == 1]
    total = 0
    for s in mined:
        for a, p, row in zip(s["anchor_idx"].tolist(), s["positive_idx"].tolist(), s["negative_idx"].tolist()):
            bad = {a, p, *tx.ancestors(a).tolist(), *tx.descendants(a).tolist()}
            got = [c for c in row if c >= 0]
            assert not bad & set(got)
            assert len(got) == 6  # no margin, no order filter: the pool always has 6 valid codes
            total += 1
    assert total > 0


def test_refresh_every_n_epochs_and_start_epoch(tmp_path):
    cb = HardNegativeMiningCallback(k=4, start_epoch=1, refresh_every_n_epochs=2, neighbours=0)
    model, _, _ = _fit(tmp_path, max_epochs=4, callbacks=[cb], phase1_end_epoch=3)
    assert cb.refresh_count == 2  # epochs 1 and 3
    assert {s["epoch"] for s in model.seen if s["negative_scores"] is not None} == {1, 2, 3}


def _negatives_by_epoch(model):
    out = {}
    for s in model.seen:
        out.setdefault(s["epoch"], []).append(s["negative_idx"])
    return {e: torch.cat(v) for e, v in out.items()}


@pytest.mark.parametrize("refresh_every", [1, 2])
def test_resume_gives_the_same_negatives(tmp_path, refresh_every):
    full, _, _ = _fit(tmp_path / "full", max_epochs=4, callbacks=[
        HardNegativeMiningCallback(k=4, refresh_every_n_epochs=refresh_every, neighbours=8)])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    _fit(tmp_path / "part", max_epochs=3, callbacks=[
        HardNegativeMiningCallback(k=4, refresh_every_n_epochs=refresh_every, neighbours=8), ckpt])
    cb = HardNegativeMiningCallback(k=4, refresh_every_n_epochs=refresh_every, neighbours=8)
    resumed, _, _ = _fit(tmp_path / "part", max_epochs=4, callbacks=[cb, ModelCheckpoint(
        dirpath=tmp_path / "ckpt2")], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert {s["epoch"] for s in resumed.seen} == {3}
    expected_refreshes = 3 if refresh_every == 1 else 2
    assert cb.refresh_count == expected_refreshes
    assert torch.equal(_negatives_by_epoch(full)[3], _negatives_by_epoch(resumed)[3])


def test_constructor_errors_quote_the_call():
    with pytest.raises(ValueError, match=r"HardNegativeMiningCallback\(k=0\)"):
        HardNegativeMiningCallback(k=0)
    with pytest.raises(ValueError, match=r"relative_margin=1.5"):
        HardNegativeMiningCallback(relative_margin=1.5)
    with pytest.raises(ValueError, match=r"device='tpu'"):
        HardNegativeMiningCallback(device="tpu")
    with pytest.raises(ValueError, match=r"refresh_every_n_epochs=0"):
        HardNegativeMiningCallback(refresh_every_n_epochs=0)
    with pytest.raises(ValueError, match=r"metric='dot'"):
        HardNegativeMiningCallback(metric="dot")
    with pytest.raises(TypeError, match=r"embed_fn=3"):
        HardNegativeMiningCallback(embed_fn=3)


def test_requires_a_datamodule_and_an_embed_method(tmp_path):
    class NoEmbed(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return self.w.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = NAICSDataModule(cache_dir=tmp_path / "cache", batch_size=8)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         callbacks=[HardNegativeMiningCallback()])
    with pytest.raises(TypeError, match="has no embed"):
        trainer.fit(NoEmbed(), datamodule=dm)
    loader = torch.utils.data.DataLoader(list(range(4)))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         callbacks=[HardNegativeMiningCallback()])
    with pytest.raises(RuntimeError, match="needs trainer.fit"):
        trainer.fit(Recorder(), train_dataloaders=loader)


def test_state_dict_is_plain_and_load_has_defaults():
    cb = HardNegativeMiningCallback()
    state = cb.state_dict()
    assert state["refresh_count"] == 0 and state["last_refresh_epoch"] is None
    cb.load_state_dict({})
    assert cb.refresh_count == 0 and cb.index is None


def _ddp_run(tmp_path, *extra):
    script = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, str(script), str(tmp_path), *extra], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]


@pytest.mark.slow
def test_ddp_shared_files_give_exactly_the_negatives_of_one_process(tmp_path):
    """Two CPU ranks (gloo) with ``shard_index``: each embeds half of the codes and maps the shared index,
    ranking vectors and neighbour lists; every mined batch equals what one process mines from the same embeddings."""
    from naics_hnm.embeddings_file import load_embeddings
    from naics_hnm.mining.miner import HardNegativeMiner
    from naics_hnm.tree.taxonomy import Taxonomy

    ranks = _ddp_run(tmp_path, "shard")
    embeddings = load_embeddings(str(ranks[0]["embeddings_file"])).embeddings
    # the epoch trains on 96 pairs: lists are built for its anchors (both ranks' together) only
    listed = np.flatnonzero((ranks[0]["neighbours"] >= 0).any(1))
    assert 0 < len(listed) <= 96 and np.isin(np.concatenate([r["mined_anchor"] for r in ranks]), listed).all()
    one = HardNegativeMiner(Taxonomy.naics2022(), k=4, neighbours=8, device="cpu")
    one.refresh(embeddings, epoch=1, anchors=listed)
    for rank in ranks:
        assert np.array_equal(rank["vectors"], one.index.vectors.numpy())
        assert np.array_equal(rank["neighbours"], one.neighbour_ids.numpy())
        _, ids, _ = one.mine(rank["mined_anchor"], rank["mined_positive"], rank["mined_pool"])
        assert np.array_equal(ids, rank["mined_negative"]) and (ids >= 0).sum() > 50
    assert not np.array_equal(ranks[0]["mined_anchor"], ranks[1]["mined_anchor"])
    # the embeddings the ranks wrote by slices are those of one process with the same weights
    np.testing.assert_allclose(embeddings, ranks[0]["reference"], atol=1e-5)


@pytest.mark.slow
def test_ddp_two_processes_share_one_index(tmp_path):
    """Two CPU ranks (gloo): each embeds a shard, all-gather, and both build the same index."""
    ranks = _ddp_run(tmp_path)
    assert np.array_equal(ranks[0]["vectors"], ranks[1]["vectors"])
    # the gathered embeddings equal a single-process embedding of every code with the same weights
    np.testing.assert_allclose(ranks[0]["vectors"], ranks[0]["reference"], atol=1e-5)
    # the ranks saw different anchors (sharded data) but mined with the same index
    assert not np.array_equal(ranks[0]["anchors"], ranks[1]["anchors"])


def test_unwritable_save_dir_fails_at_setup_not_after_training(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    dm = NAICSDataModule(cache_dir=tmp_path / "cache", batch_size=8)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
                         callbacks=[HardNegativeMiningCallback(save_dir=blocker)])
    model = Recorder()
    with pytest.raises(ValueError, match=r"HardNegativeMiningCallback\(save_dir\)=.*not_a_folder' is a file"):
        trainer.fit(model, datamodule=dm)
    assert model.seen == []


def test_start_epoch_at_or_past_max_epochs_warns_once(tmp_path, caplog):
    cb = HardNegativeMiningCallback(k=2, start_epoch=5)
    with caplog.at_level(logging.WARNING, logger="naics_hnm"):
        _fit(tmp_path, max_epochs=2, callbacks=[cb])
    warned = [r for r in caplog.records if "no epoch is mined" in r.getMessage()]
    assert len(warned) == 1 and "starts at epoch 5 but max_epochs=2" in warned[0].getMessage()
