"""Resuming the stream from checkpointed positions over real shards: exact continuation on the
same world size, and in fixed mode exactly-once epochs when the number of ranks (or workers)
changes, including a second change before the interrupted epoch is over."""

import random
from collections import Counter, defaultdict

import pytest

from data_pipeline.crops import CropSpec, MultiCrop
from data_pipeline.manifest import shard_paths
from data_pipeline.shards import iter_shard
from data_pipeline.stream import ShardStream, StreamPosition, collate_views, make_loader
from data_pipeline.stream_order import resume_state

CROPS = MultiCrop([CropSpec(16, 1, (0.5, 1.0))])
SEED = 11


def corpus(folder):
    return sorted(s.key for p in shard_paths(folder) for s in iter_shard(p))


def stream(folder, rank, world, state=None, mode="fixed", window=0):
    return ShardStream(folder, CROPS, mode=mode, seed=SEED, rank=rank, world_size=world, state=state, poll_seconds=5,
                       window=window)


def run_rank(folder, rank, world, workers, n_batches, state=None, batch_size=3):
    """What a trainer rank consumes: (epoch, key) per sample of ``n_batches`` batches, and its state."""
    position = StreamPosition(state)
    consumed = []
    loader = make_loader(stream(folder, rank, world, state), batch_size, workers)
    for i, batch in enumerate(loader):
        if i == n_batches:
            break
        consumed += list(zip(batch["epochs"], batch["keys"]))
        position.update(batch)
    return consumed, position.state_dict()


def run_until_epoch_done(folder, rank, world, workers, state, last_epoch, batch_size=3):
    """Consume until every worker of the rank has delivered a sample of an epoch > ``last_epoch``."""
    position = StreamPosition(state)
    consumed, past = [], set()
    for batch in make_loader(stream(folder, rank, world, state), batch_size, workers):
        consumed += list(zip(batch["epochs"], batch["keys"]))
        position.update(batch)
        if batch["epochs"][-1] > last_epoch:
            past.add(batch["position"]["slot"])
            if len(past) == workers:
                return consumed
    raise AssertionError("unreachable: the stream is endless")


def assert_epochs_exact(consumed, keys, epochs):
    by_epoch = defaultdict(Counter)
    for epoch, key in consumed:
        by_epoch[epoch][key] += 1
    for epoch in epochs:
        seen = by_epoch[epoch]
        assert sorted(seen) == keys, f"epoch {epoch}: {len(seen)} distinct keys of {len(keys)}"
        assert set(seen.values()) == {1}, f"epoch {epoch}: duplicates {[k for k, n in seen.items() if n > 1]}"


@pytest.mark.slow
def test_same_world_size_resume_continues_every_rank_exactly(shard_dir):
    world, workers, total, stop = 2, 2, 9, 4
    uninterrupted = [run_rank(shard_dir, r, world, workers, total)[0] for r in range(world)]
    saved = [run_rank(shard_dir, r, world, workers, stop) for r in range(world)]
    states = [state for _, state in saved]
    for r in range(world):
        rest, _ = run_rank(shard_dir, r, world, workers, total - stop, resume_state(states, r, world, workers))
        assert saved[r][0] + rest == uninterrupted[r]


@pytest.mark.slow
@pytest.mark.parametrize("new_world", [2, 3])
def test_fixed_epoch_exact_after_resume_on_other_world_size(shard_dir, new_world):
    """2 ranks x 2 workers stop mid-epoch (38 samples, 4 slots of ~9.5, 2 batches of 3 each);
    2 or 3 ranks finish the epoch: every sample exactly once in epochs 0 and 1."""
    keys = corpus(shard_dir)
    saved = [run_rank(shard_dir, r, 2, 2, 4) for r in range(2)]
    consumed = [item for items, _ in saved for item in items]
    assert {e for e, _ in consumed} == {0}
    states = [state for _, state in saved]
    for r in range(new_world):
        state = resume_state(states, r, new_world, 2)
        consumed += run_until_epoch_done(shard_dir, r, new_world, 2, state, last_epoch=1)
    assert_epochs_exact(consumed, keys, epochs=[0, 1])


@pytest.mark.slow
def test_fixed_epoch_exact_across_two_rank_changes(shard_dir):
    """2 ranks -> 3 ranks before epoch 0 ends -> 2 ranks again: epochs 0 and 1 still exact."""
    keys = corpus(shard_dir)
    saved = [run_rank(shard_dir, r, 2, 2, 3, batch_size=2) for r in range(2)]
    consumed = [item for items, _ in saved for item in items]
    states = [state for _, state in saved]
    saved = [run_rank(shard_dir, r, 3, 2, 1, resume_state(states, r, 3, 2), batch_size=2) for r in range(3)]
    consumed += [item for items, _ in saved for item in items]
    states = [state for _, state in saved]
    for r in range(2):
        consumed += run_until_epoch_done(shard_dir, r, 2, 2, resume_state(states, r, 2, 2), last_epoch=1)
    assert_epochs_exact(consumed, keys, epochs=[0, 1])


def simulate(folder, world, states, steps, rng, workers=1, window=0):
    """Single-process ranks (1 slot each) consuming uneven numbers of samples; returns states."""
    consumed, new_states = [], []
    for r in range(world):
        state = resume_state(states, r, world, workers) if states else None
        position = StreamPosition(state)
        items = iter(stream(folder, r, world, state, window=window))
        for _ in range(rng.randrange(steps)):
            item = next(items)
            consumed.append((item["position"]["epoch"], item["key"]))
            position.update(collate_views([item]))
        new_states.append(position.state_dict())
    return consumed, new_states


@pytest.mark.parametrize("trial,window", [(0, 0), (1, 0), (2, 0), (3, 2)])
def test_fixed_epochs_exact_over_random_world_size_changes(shard_dir, trial, window):
    """Uneven progress per slot (epochs overlap), three world-size changes, then finish; also with
    a locality window (shards interleaved two at a time)."""
    rng = random.Random(trial)
    keys = corpus(shard_dir)
    consumed, states = [], None
    for world in [rng.randint(1, 5) for _ in range(3)]:
        items, states = simulate(shard_dir, world, states, 30, rng, window=window)
        consumed += items
    last = max(e for e, _ in consumed)
    world = rng.randint(1, 4)
    for r in range(world):
        state = resume_state(states, r, world, 1)
        for item in stream(shard_dir, r, world, state, window=window):
            if item["position"]["epoch"] > last:
                break
            consumed.append((item["position"]["epoch"], item["key"]))
    assert_epochs_exact(consumed, keys, epochs=range(last + 1))


def test_single_rank_state_follows_a_worker_count_change(shard_dir):
    """One rank's own state is complete: a loader with fewer workers deals the rest itself."""
    keys = corpus(shard_dir)
    consumed, state = run_rank(shard_dir, 0, 1, 2, 3)
    consumed += run_until_epoch_done(shard_dir, 0, 1, 1, state, last_epoch=0)
    assert_epochs_exact(consumed, keys, epochs=[0])


def test_one_rank_state_of_several_needs_resume_state(shard_dir):
    _, state = simulate(shard_dir, 2, None, 5, random.Random(0))
    with pytest.raises(ValueError, match="resume_state"):
        next(iter(stream(shard_dir, 0, 3, state[0])))
    with pytest.raises(ValueError, match="every rank"):
        resume_state(state[:1], 0, 3, 1)


def test_online_resume_on_other_world_size_reseeds(shard_dir):
    states = []
    for r in range(2):
        position = StreamPosition()
        items = iter(stream(shard_dir, r, 2, mode="online"))
        for _ in range(5):
            position.update(collate_views([next(items)]))
        states.append(position.state_dict())
    same = resume_state(states, 1, 2, 1)
    assert same["generation"] == 0 and same["slots"] == states[1]["slots"]
    state = resume_state(states, 2, 3, 1)
    assert state["generation"] == 1 and state["slots"] == {} and state["n_slots"] == 3
    item = next(iter(stream(shard_dir, 2, 3, state, mode="online")))
    assert item["key"] in corpus(shard_dir)


def test_fixed_state_over_a_shrunk_corpus_restarts_instead_of_failing(shard_dir, tmp_path, caplog):
    """A shard of the pinned corpus was removed: positions are void; the stream warns and goes on."""
    import shutil

    from data_pipeline.manifest import Manifest

    folder = tmp_path / "shards"
    shutil.copytree(shard_dir, folder)
    _, states = simulate(folder, 1, None, 12, random.Random(1))
    manifest = Manifest.load(folder)
    gone = manifest.shards.pop(0)
    manifest.save()
    (folder / f"{gone.name}.tar").unlink()
    with caplog.at_level("WARNING"):
        items = iter(stream(folder, 0, 1, resume_state(states, 0, 1, 1)))
        keys = {next(items)["key"] for _ in range(10)}
    assert "restarts" in caplog.text
    assert not any(key.startswith(gone.name) for key in keys)
