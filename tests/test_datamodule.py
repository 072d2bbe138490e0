"""NAICSDataModule: epoch-exact negatives through a real Trainer (worker processes, resume), loaders,
the token cache life cycle and argument checks."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import TINY_ROWS
from naics_hnm.data.collate import collate_fn
from naics_hnm.data.config import SamplingConfig, StreamingConfig
from naics_hnm.train import datamodule as datamodule_module
from naics_hnm.train.datamodule import NAICSDataModule, default_cache_dir
from naics_hnm.train.encoder import TINY_BERT, NAICSEncoder
from naics_hnm.data.token_cache import TokenCacheError, read_fingerprint

BATCH, PAIRS, EPOCHS, PHASE1_END = 64, 300, 3, 3


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dm_cache")
    NAICSDataModule(cache_dir=path).prepare_data()
    return path


def make_dm(cache_dir, num_workers=0, **kwargs):
    args = dict(batch_size=BATCH, num_workers=num_workers, cache_dir=cache_dir, phase1_end_epoch=PHASE1_END,
                pairs_per_epoch=PAIRS, seed=3)
    args.update(kwargs)
    return NAICSDataModule(**args)


class Recorder(NAICSEncoder):
    """The tiny BERT encoder, recording what every training step receives."""

    def __init__(self) -> None:
        super().__init__(config=TINY_BERT)
        self.records: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.records.append((self.current_epoch, batch["anchor_idx"].clone(), batch["negative_idx"].clone(),
                             batch["candidate_idx"].clone()))
        return super().training_step(batch, batch_idx)


def fit(dm, max_epochs, callbacks=(), ckpt_path=None, checkpointing=False):
    """A short real fit. Intra-op threads are 1 for its duration only (restored after): on a busy 2-core
    machine two OpenMP threads make each tiny step 10x slower; the data under test does not depend on it."""
    torch.manual_seed(0)
    model = Recorder()
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, limit_val_batches=1,
                         num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                         logger=False, enable_checkpointing=checkpointing, callbacks=list(callbacks))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    finally:
        torch.set_num_threads(threads)
    return model.records


def by_epoch(records):
    out: dict[int, list] = {}
    for epoch, *tensors in records:
        out.setdefault(epoch, []).append(tensors)
    return out


def expected_batches(dm, epoch):
    """What the dataset computes for ``epoch``, in the sampler's order, collated like the loader does."""
    indices = dm._train_sampler.epoch_indices(epoch)
    items = dm.train_dataset.__getitems__([(epoch, i) for i in indices])
    return [collate_fn(items[s:s + BATCH]) for s in range(0, len(items), BATCH)]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for (anchor, negative, candidate), ref in zip(got, want):
        assert torch.equal(anchor, ref["anchor_idx"])
        assert torch.equal(negative, ref["negative_idx"])
        assert torch.equal(candidate, ref["candidate_idx"])


@pytest.fixture(scope="module")
def run_workers2(cache_dir):
    dm = make_dm(cache_dir, num_workers=2)
    return dm, by_epoch(fit(dm, EPOCHS))


@pytest.mark.slow
def test_trainer_epochs_see_the_dataset_epoch(run_workers2, cache_dir):
    """Persistent workers + a real Trainer: the negatives of epoch e are exactly the dataset's epoch-e items."""
    dm, seen = run_workers2
    assert dm.train_dataloader().persistent_workers
    assert sorted(seen) == list(range(EPOCHS))
    for epoch in range(EPOCHS):
        assert sum(len(a) for a, _, _ in seen[epoch]) == PAIRS
        assert_same_batches(seen[epoch], expected_batches(dm, epoch))
    # and the epochs really differ (otherwise the check above could not tell them apart)
    first = torch.cat([n for _, n, _ in seen[0]])
    assert not torch.equal(first, torch.cat([n for _, n, _ in seen[1]]))
    wrong_epoch = expected_batches(dm, 0)
    assert not all(torch.equal(n, ref["negative_idx"]) for (_, n, _), ref in zip(seen[1], wrong_epoch))


@pytest.mark.slow
def test_trainer_workers_0_equals_workers_2(run_workers2, cache_dir):
    _, seen2 = run_workers2
    dm0 = make_dm(cache_dir, num_workers=0)
    seen0 = by_epoch(fit(dm0, EPOCHS))
    assert not dm0.train_dataloader().persistent_workers
    for epoch in range(EPOCHS):
        for a, b in zip(seen0[epoch], seen2[epoch]):
            for x, y in zip(a, b):
                assert torch.equal(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [2, 0])
def test_resume_continues_with_the_right_epoch(run_workers2, cache_dir, tmp_path, num_workers):
    """Fit 2 epochs, resume from last.ckpt to 3: epoch 2 sees what an uninterrupted run saw in epoch 2."""
    _, uninterrupted = run_workers2
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = by_epoch(fit(make_dm(cache_dir, num_workers=num_workers), 2, callbacks=[ckpt], checkpointing=True))
    assert sorted(first) == [0, 1]
    assert (tmp_path / "last.ckpt").is_file()
    resumed = by_epoch(fit(make_dm(cache_dir, num_workers=num_workers), EPOCHS, ckpt_path=str(tmp_path / "last.ckpt"),
                           callbacks=[ModelCheckpoint(dirpath=tmp_path / "again")], checkpointing=True))
    assert sorted(resumed) == [2]
    for a, b in zip(resumed[2], uninterrupted[2]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert len(resumed[2]) == len(uninterrupted[2])


def _iterate(loader):
    return [(b["anchor_idx"], b["negative_idx"], b["candidate_idx"]) for b in loader]


def test_loaders_shuffle_train_and_fix_validation(cache_dir):
    dm = make_dm(cache_dir)
    dm.setup()
    train = dm.train_dataloader()
    val = dm.val_dataloader()
    assert len(dm.val_dataset) == round(0.05 * (len(dm.train_dataset) + len(dm.val_dataset)))
    orders, val_runs = {}, []
    for epoch in (0, 1, 0):
        dm.set_epoch(epoch)
        batches = _iterate(train)
        order = torch.cat([a for a, _, _ in batches])
        if epoch in orders:
            assert torch.equal(order, orders[epoch])  # the same epoch gives the same order
        orders[epoch] = order
        val_runs.append(_iterate(val))
        assert_same_batches(batches, expected_batches(dm, epoch))
    assert len(orders[0]) == PAIRS
    assert not torch.equal(orders[0], orders[1])
    assert len(set(dm._train_sampler.epoch_indices(0)) ^ set(dm._train_sampler.epoch_indices(1))) > 0
    for run in val_runs[1:]:
        for a, b in zip(run, val_runs[0]):
            for x, y in zip(a, b):
                assert torch.equal(x, y)
    val_anchor_order = torch.cat([a for a, _, _ in val_runs[0]])
    assert torch.equal(val_anchor_order, torch.as_tensor(dm.val_dataset.anchors))  # in order, not shuffled


def test_validation_pairs_are_capped_and_the_rest_train(cache_dir, monkeypatch):
    """A large tree keeps at most MAX_VAL_PAIRS validation pairs (presampled in memory); none is lost."""
    full = make_dm(cache_dir)
    full.setup()
    total = len(full.train_dataset) + len(full.val_dataset)
    monkeypatch.setattr(datamodule_module, "MAX_VAL_PAIRS", 7)
    capped = make_dm(cache_dir)
    capped.setup()
    assert len(capped.val_dataset) == 7 < len(full.val_dataset)
    assert len(capped.train_dataset) == total - 7
    val = set(zip(capped.val_dataset.anchors.tolist(), capped.val_dataset.positives.tolist()))
    train = set(map(tuple, capped.train_dataset.pairs.tolist()))
    assert len(val) == 7 and not val & train


def test_epoch_anchors_are_the_anchors_the_epoch_trains_on(cache_dir):
    dm = make_dm(cache_dir)
    dm.setup()
    data = dm.mining_data()
    for epoch in (0, 4):
        dm.set_epoch(epoch)
        seen = torch.cat([a for a, _, _ in _iterate(dm.train_dataloader())]).unique().numpy()
        assert np.array_equal(data.epoch_anchors(epoch), seen)
    assert not np.array_equal(data.epoch_anchors(0), data.epoch_anchors(4))
    assert make_dm(cache_dir, pairs_per_epoch=None).mining_data().epoch_anchors is None  # every code


def test_prepare_data_builds_once_and_keys_the_file_by_content(tmp_path):
    dm = NAICSDataModule(cache_dir=tmp_path)
    dm.prepare_data()
    path = dm.cache_path
    assert path.is_file() and path.parent == tmp_path
    stat = path.stat()
    fingerprint = read_fingerprint(path)
    NAICSDataModule(cache_dir=tmp_path).prepare_data()
    again = path.stat()
    assert (again.st_mtime_ns, again.st_ino) == (stat.st_mtime_ns, stat.st_ino)  # built once
    shorter = NAICSDataModule(cache_dir=tmp_path, max_length=16)
    shorter.prepare_data()
    assert shorter.cache_path != path and read_fingerprint(shorter.cache_path) != fingerprint
    assert path.stat().st_ino == stat.st_ino and read_fingerprint(path) == fingerprint  # the other run's file stays
    shorter.setup()
    assert int(shorter.token_cache.lengths.max()) <= 16
    longer = NAICSDataModule(cache_dir=tmp_path)
    longer.setup()  # both runs share the folder and each finds its own cache
    assert int(longer.token_cache.lengths.max()) > 16


def test_setup_without_prepare_data(tmp_path):
    dm = NAICSDataModule(cache_dir=tmp_path)
    with pytest.raises(TokenCacheError, match=r"does not exist: run prepare_data\(\) first"):
        dm.setup()
    with pytest.raises(RuntimeError, match=r"train_dataloader\(\) called before setup\(\)"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match=r"val_dataloader\(\) called before setup\(\)"):
        dm.val_dataloader()


def test_defaults_point_at_naics2022():
    dm = NAICSDataModule()
    assert dm.cache_dir == default_cache_dir()
    assert dm.taxonomy_source is None
    assert (dm.batch_size, dm.num_workers, dm.seed) == (256, 0, 42)
    assert dm.cfg == StreamingConfig() and dm.sampling_cfg == SamplingConfig()
    taxonomy = dm._taxonomy()
    assert taxonomy.name == "naics2022" and len(taxonomy) == 2125
    assert dm.cache_path.name.startswith("tokens_naics2022_")


def test_csv_taxonomy_and_exclusions_through_the_datamodule(make_csv, tmp_path):
    rows = TINY_ROWS + [("1112", "Vegetable Farming"), ("1121", "Cattle Ranching"), ("3112", "Grain Milling")]
    path = make_csv(rows, name="tiny")
    dm = NAICSDataModule(taxonomy=path, cache_dir=tmp_path, batch_size=4, n_negatives=2, n_candidates=3,
                         val_fraction=0.0, exclude_codes=("3112",), phase1_end_epoch=1)
    dm.prepare_data()
    assert dm.cache_path.name.startswith("tokens_tiny_")
    dm.setup()
    assert dm.train_dataset.taxonomy.codes == sorted(c for c, _ in rows)
    assert dm.cfg.taxonomy == str(path)
    seen = set()
    for batch in dm.train_dataloader():
        seen |= set(batch["anchor_code"]) | set(batch["positive_code"])
        seen |= {dm.train_dataset.taxonomy.codes[i] for i in batch["candidate_idx"][batch["candidate_idx"] >= 0].tolist()}
    assert "3112" not in seen and {"111", "1111"} <= seen


def test_seed_changes_negatives_and_order(cache_dir):
    a, b = make_dm(cache_dir, seed=3), make_dm(cache_dir, seed=4)
    for dm in (a, b):
        dm.setup()
    batch_a, batch_b = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert not torch.equal(batch_a["anchor_idx"], batch_b["anchor_idx"])
    assert a.train_dataset.pairs.shape == b.train_dataset.pairs.shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), r"batch_size=0"),
        (dict(batch_size="64"), r"batch_size='64'"),
        (dict(num_workers=-1), r"num_workers=-1"),
        (dict(phase1_end_epoch=-1), r"phase1_end_epoch=-1"),
        (dict(phase1_end_epoch=1.5), r"phase1_end_epoch=1.5"),
        (dict(val_fraction=1.0), r"val_fraction=1.0"),
        (dict(seed=-3), r"seed=-3"),
        (dict(n_negatives=0), r"n_negatives=0"),
        (dict(n_negatives=8, n_candidates=4), r"n_candidates=4"),
        (dict(positive_relations=("cousin",)), r"positive_relations=\('cousin',\)"),
        (dict(max_siblings=0), r"max_siblings=0"),
        (dict(pairs_per_epoch=0), r"pairs_per_epoch=0"),
        (dict(max_length=1), r"max_length=1"),
    ],
)
def test_bad_constructor_arguments(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        NAICSDataModule(cache_dir=tmp_path, **kwargs)


def test_trees_sharing_a_file_stem_and_titles_but_not_codes_share_a_cache_dir(tmp_path):
    """Issue 16: a/tree.csv and b/tree.csv, same titles, other codes, one cache_dir: each keeps its own cache."""
    for folder, top in (("a", "11"), ("b", "21")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "tree.csv").write_text(
            f"code,title\n{top},Farming\n{top}1,Crops\n{top}2,Animals\n{top}11,Grain\n{top}12,Fruit\n{top}21,Cattle\n")
    cache = tmp_path / "cache"
    a = NAICSDataModule(taxonomy=tmp_path / "a" / "tree.csv", cache_dir=cache, batch_size=2, val_fraction=0.0,
                        n_negatives=1, n_candidates=2)
    b = NAICSDataModule(taxonomy=tmp_path / "b" / "tree.csv", cache_dir=cache, batch_size=2, val_fraction=0.0,
                        n_negatives=1, n_candidates=2)
    assert a._taxonomy().texts == b._taxonomy().texts and a._taxonomy().name == b._taxonomy().name
    a.prepare_data()
    b.prepare_data()
    a.setup()
    b.setup()
    assert a.token_cache.codes == a._taxonomy().codes and b.token_cache.codes == b._taxonomy().codes
    assert a.cache_path != b.cache_path


def test_a_tree_without_training_pairs_says_so(tmp_path):
    path = tmp_path / "flat.csv"
    path.write_text("code,title,parent\nA,Apples,\nB,Bananas,\nC,Cherries,\n")
    dm = NAICSDataModule(taxonomy=path, cache_dir=tmp_path / "cache", batch_size=2, val_fraction=0.0)
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"no training pairs \(0 \(code, positive\) pairs"):
        dm.setup()
