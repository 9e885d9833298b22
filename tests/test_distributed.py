"""torchrun / FSDP2: N ranks must train exactly like one process on the same global batch.

The multi-process tests spawn 2 gloo processes on the CPU (torch.multiprocessing) and run the real trainers; the
one-process runs are the references. fp32 everywhere: the only difference left is the order in which float sums
are taken (a gradient reduced over 2 ranks adds 2 partial sums instead of one running sum), so the tolerances
below are a few ulps of fp32 scaled by the number of terms, not fitted to a run.
"""

import data


def test_sampler_shares_are_disjoint_cover_the_batch_and_resume_exactly():
    num_items, world, batch = 23, 3, 6  # batches cross epoch boundaries
    alone = data.EpochSampler(num_items, seed=5)
    ranks = [data.EpochSampler(num_items, seed=5, rank=r, world_size=world) for r in range(world)]
    for _ in range(10):
        shares = [sampler.next_batch(batch) for sampler in ranks]
        assert all(len(share) == batch // world for share in shares)
        assert sum(shares, []) == alone.next_batch(batch)  # together: the one-process batch, in order
    # disjoint and covering: over one epoch, every record comes exactly once across the ranks
    fresh = [data.EpochSampler(12, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = sum((s.next_batch(4) for _ in range(3) for s in fresh), [])
    assert sorted(seen) == list(range(12))
    # resume: a sampler restored from rank 1's state continues rank 1's shares
    restored = data.EpochSampler(num_items, seed=5, rank=1, world_size=world)
    restored.load_state_dict(ranks[1].state_dict())
    assert [restored.next_batch(batch) for _ in range(5)] == [ranks[1].next_batch(batch) for _ in range(5)]


def test_sampler_refuses_a_batch_that_does_not_split_over_the_ranks():
    import pytest

    with pytest.raises(ValueError, match="does not split evenly over 4 ranks"):
        data.EpochSampler(10, seed=0, rank=0, world_size=4).next_batch(6)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        data.EpochSampler(10, seed=0, rank=2, world_size=2)
