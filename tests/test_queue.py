"""MomentumQueue: FIFO order, wrap-around, identical contents across gloo ranks, checkpoint round-trip."""

import torch

from sslpipe.memory import MomentumQueue
from tests.helpers import run_distributed


def _reference_writes(initial: torch.Tensor, batches: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Independent model of the queue: write keys one at a time at a pointer that wraps at K."""
    rows = [row.clone() for row in initial]
    ptr = 0
    for batch in batches:
        for key in batch:
            rows[ptr] = key.clone()
            ptr = (ptr + 1) % len(rows)
    return torch.stack(rows), ptr


def _keys(n: int, dim: int, start: float) -> torch.Tensor:
    """Keys whose first coordinate counts up from ``start``, so every row is recognisable."""
    keys = torch.zeros(n, dim)
    keys[:, 0] = torch.arange(n, dtype=torch.float32) + start
    return keys


def test_fifo_order_and_wrap_around_with_k_not_a_multiple_of_the_batch():
    queue = MomentumQueue(size=7, dim=3)
    initial = queue.queue.clone()
    assert torch.allclose(initial.norm(dim=1), torch.ones(7))  # starts as unit vectors
    batches = [_keys(3, 3, 100 * (i + 1)) for i in range(4)]  # 12 keys into 7 rows: wraps mid-batch twice
    for i, batch in enumerate(batches):
        queue.enqueue(batch)
        expected, ptr = _reference_writes(initial, batches[: i + 1])
        assert torch.equal(queue.queue, expected), f"after batch {i}"
        assert int(queue.ptr) == ptr
    # The queue now holds the newest 7 keys; the oldest surviving one sits at the pointer.
    assert int(queue.ptr) == 12 % 7
    newest_in_order = torch.cat([queue.queue[int(queue.ptr) :], queue.queue[: int(queue.ptr)]])
    assert torch.equal(newest_in_order, torch.cat(batches)[-7:])


def test_a_batch_larger_than_the_queue_keeps_the_newest_keys():
    queue = MomentumQueue(size=4, dim=2)
    initial = queue.queue.clone()
    queue.enqueue(_keys(2, 2, 0))
    big = _keys(9, 2, 50)
    queue.enqueue(big)
    expected, ptr = _reference_writes(initial, [_keys(2, 2, 0), big])
    assert torch.equal(queue.queue, expected) and int(queue.ptr) == ptr == 11 % 4


def test_checkpoint_round_trip_restores_contents_and_pointer(tmp_path):
    queue = MomentumQueue(size=10, dim=4, seed=1)
    for _ in range(3):
        queue.enqueue(torch.randn(4, 4))
    path = tmp_path / "queue.pt"
    torch.save(queue.state_dict(), path)
    restored = MomentumQueue(size=10, dim=4, seed=2)  # different initial contents on purpose
    restored.load_state_dict(torch.load(path))
    assert torch.equal(restored.queue, queue.queue) and int(restored.ptr) == int(queue.ptr) == 12 % 10
    more = torch.randn(4, 4)
    queue.enqueue(more)
    restored.enqueue(more)
    assert torch.equal(restored.queue, queue.queue) and int(restored.ptr) == int(queue.ptr)


def _distributed_enqueue(rank: int, world_size: int) -> dict:
    queue = MomentumQueue(size=11, dim=3)  # 11 rows, global batch 2 x 3 = 6: wraps mid-write
    initial = queue.queue.clone()
    for step in range(3):
        queue.enqueue(_keys(3, 3, 1000 * step + 100 * rank))  # each rank enqueues different keys
    return {"queue": queue.queue, "ptr": int(queue.ptr), "initial": initial}


def test_two_gloo_ranks_hold_identical_queues_of_all_ranks_keys():
    results = run_distributed(_distributed_enqueue, 2)
    assert torch.equal(results[0]["queue"], results[1]["queue"])
    assert results[0]["ptr"] == results[1]["ptr"] == 18 % 11
    # Independent expectation: per step, rank 0's keys then rank 1's, written one by one.
    batches = [torch.cat([_keys(3, 3, 1000 * step), _keys(3, 3, 1000 * step + 100)]) for step in range(3)]
    expected, _ = _reference_writes(results[0]["initial"], batches)
    assert torch.equal(results[0]["queue"], expected)


def test_queue_stays_fp32_when_the_model_is_cast():
    queue = MomentumQueue(size=6, dim=4)
    before = queue.queue.clone()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), queue).to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16  # the rest of the model was cast
    assert queue.queue.dtype == torch.float32 and torch.equal(queue.queue, before)
    assert queue.ptr.dtype == torch.long


def test_a_loaded_pointer_is_where_the_next_keys_go():
    saved = MomentumQueue(size=10, dim=4, seed=1)
    saved.enqueue(torch.randn(7, 4))
    fresh = MomentumQueue(size=10, dim=4, seed=2)
    fresh.load_state_dict(saved.state_dict())
    keys = torch.randn(2, 4)
    fresh.enqueue(keys)
    assert torch.equal(fresh.queue[7:9], keys) and int(fresh.ptr) == 9
