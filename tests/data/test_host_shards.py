"""Each host reading only its own train shards: the shard assignment, the order, and the prepared reader."""
import numpy as np
import pytest

from ctr import prepare
from ctr.data import dataset, prepared, splits, synthetic


@pytest.mark.parametrize("shard_rows,hosts", [([100] * 8, 4), ([70, 50, 40, 30, 30, 20, 10], 3), ([5, 5], 2)])
def test_assignment_covers_every_shard_once_and_balances_rows(shard_rows, hosts):
    owned = dataset.assign_shards(shard_rows, hosts)
    assert sorted(k for o in owned for k in o) == list(range(len(shard_rows)))
    totals = [sum(shard_rows[k] for k in o) for o in owned]
    assert max(totals) - min(totals) <= max(shard_rows)
    assert all(o == sorted(o) and o for o in owned)


def test_fewer_shards_than_hosts_is_refused():
    with pytest.raises(ValueError, match="3 train shards cannot be spread over 4 hosts"):
        dataset.assign_shards([10, 10, 10], 4)


@pytest.mark.parametrize("block_rows", [1, 8])
def test_one_host_order_is_the_global_order(block_rows):
    own = dataset.host_train_rows([1000], 64, 3, seed=7, block_rows=block_rows)
    ref = dataset.train_rows(1000, 64, 3, seed=7, block_rows=block_rows)
    for _ in range(40):  # crosses two epoch boundaries (15 steps an epoch)
        np.testing.assert_array_equal(next(own), next(ref))


def _epoch(host_rows, global_batch, seed, epoch=0):
    """{host: the host-local rows it reads in one epoch}."""
    steps = dataset.host_steps_per_epoch(host_rows, global_batch)
    out = {}
    for p in range(len(host_rows)):
        it = dataset.host_train_rows(host_rows, global_batch, epoch * steps, seed, p)
        out[p] = np.concatenate([next(it) for _ in range(steps)])
    return steps, out


def test_even_hosts_read_their_rows_exactly_once_per_epoch():
    steps, read = _epoch([96, 96, 96], 24, seed=1)
    assert steps == 12
    for p, rows in read.items():
        np.testing.assert_array_equal(np.sort(rows), np.arange(96))
    _, again = _epoch([96, 96, 96], 24, seed=1, epoch=1)
    assert not np.array_equal(read[0], again[0])  # reshuffled every epoch
    assert not np.array_equal(read[0], read[1])  # and differently on each host


def test_uneven_hosts_never_repeat_and_count_what_they_leave():
    host_rows = [100, 90, 130]
    steps, read = _epoch(host_rows, 30, seed=2)
    assert steps == 9  # the 90-row host runs out first: 9 steps of 10 rows
    for p, rows in read.items():
        assert len(np.unique(rows)) == len(rows) == steps * 10
        assert rows.max() < host_rows[p]


def test_resume_is_exact():
    full = dataset.host_train_rows([50, 60], 20, 0, seed=4, process_index=1)
    reference = [next(full) for _ in range(12)]
    resumed = dataset.host_train_rows([50, 60], 20, 7, seed=4, process_index=1)
    for expected in reference[7:]:
        np.testing.assert_array_equal(next(resumed), expected)


def test_host_count_change_is_refused_mid_epoch_only():
    dataset.check_resume_host_count(step=20, steps_per_epoch=10, saved=2, current=4)  # epoch boundary
    dataset.check_resume_host_count(step=25, steps_per_epoch=10, saved=4, current=4)
    dataset.check_resume_host_count(step=25, steps_per_epoch=10, saved=None, current=4)  # older checkpoint
    with pytest.raises(ValueError, match="written by 2 hosts, this job has 4"):
        dataset.check_resume_host_count(step=25, steps_per_epoch=10, saved=2, current=4)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    raw_dir = tmp_path_factory.mktemp("raw")
    synthetic.criteo.write_synthetic(str(raw_dir / "train.txt"), 4000, seed=1)
    out = str(tmp_path_factory.mktemp("prepared"))
    prepare.prepare("criteo", str(raw_dir), out, splits.SplitSpec(), seed=0, shard_bytes=60_000)
    return out


def test_each_host_opens_only_its_shards_and_together_they_read_the_split_once(prepared_dir):
    whole = prepared.prepared(prepared_dir)
    shards = whole.metadata["splits"]["train"]["shards"]
    assert len(shards) >= 4
    hosts = 2
    global_batch = 16
    seen, opened = [], []
    for p in range(hosts):
        data = prepared.prepared(prepared_dir, host_shards=True)
        steps = data.steps_per_epoch(global_batch, hosts)
        batches = data.train_batches(global_batch, 0, seed=3, process_index=p, process_count=hosts)
        batch = [next(batches) for _ in range(steps)]
        seen.append(np.concatenate([np.concatenate([b["dense"], b["label"][:, None]], 1) for b in batch]))
        opened.append({name.split(".")[0] for name in data.opened})
    assert not opened[0] & opened[1]
    assert opened[0] | opened[1] == {s["path"] for s in shards}
    # Every row read at most once in the epoch, and all but the counted leftover rows read.
    rows = np.concatenate(seen)
    assert len(np.unique(rows, axis=0)) == len(rows)
    everything = next(whole.eval_batches("train", 1 << 20))[0]
    all_rows = np.concatenate([everything["dense"], everything["label"][:, None]], 1)[: whole.num_rows("train")]
    assert len(rows) == steps * global_batch <= len(all_rows)
    assert {r.tobytes() for r in rows} <= {r.tobytes() for r in all_rows}
