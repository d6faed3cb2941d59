"""Memory bank: initialisation, EMA math, negatives, identical banks on 2 gloo ranks, checkpoint round-trip."""

import io
import math

import torch
from torch import nn

from sslpipe.memory import MemoryBank
from tests.helpers import run_distributed


def _unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def _ema_row(old: list[float], new: list[float], alpha: float) -> list[float]:
    """m <- alpha m + (1 - alpha) v, then divided by its Euclidean length, written out element by element."""
    mixed = [alpha * o + (1 - alpha) * v for o, v in zip(old, new)]
    length = math.sqrt(sum(x * x for x in mixed))
    return [x / length for x in mixed]


def test_init_is_unit_norm_and_seeded():
    a, b, c = MemoryBank(50, 8, seed=1), MemoryBank(50, 8, seed=1), MemoryBank(50, 8, seed=2)
    assert a.bank.dtype == torch.float32 and a.bank.shape == (50, 8)
    torch.testing.assert_close(a.bank.norm(dim=1), torch.ones(50))
    assert torch.equal(a.bank, b.bank) and not torch.equal(a.bank, c.bank)
    assert a.bank.std(0).min() > 0.1  # random directions, not one vector repeated


def test_ema_update_math_and_renormalisation():
    bank = MemoryBank(10, 4, momentum=0.3, seed=0)
    old = bank.bank.clone()
    indices = torch.tensor([7, 2])
    emb = _unit_rows(2, 4, seed=5)
    bank.update(indices, emb)
    for row in range(10):
        if row in (7, 2):
            k = [7, 2].index(row)
            expected = torch.tensor(_ema_row(old[row].tolist(), emb[k].tolist(), 0.3))
        else:
            expected = old[row]
        torch.testing.assert_close(bank.bank[row], expected)
    torch.testing.assert_close(bank.bank.norm(dim=1), torch.ones(10))


def test_repeated_index_keeps_its_first_occurrence():
    bank = MemoryBank(6, 3, momentum=0.5, seed=0)
    old = bank.bank[4].tolist()
    emb = _unit_rows(3, 3, seed=1)
    bank.update(torch.tensor([4, 1, 4]), emb)
    torch.testing.assert_close(bank.bank[4], torch.tensor(_ema_row(old, emb[0].tolist(), 0.5)))


def test_negatives_exclude_own_index_and_are_uniform():
    bank = MemoryBank(12, 4)
    indices = torch.tensor([0, 5, 11, 3])
    counts = torch.zeros(4, 12)
    torch.manual_seed(0)
    trials = 3000
    for _ in range(trials):
        slots, exclude = bank.sample_negatives(indices, 4)
        assert slots.shape == (5,) and exclude.shape == (4,)
        mask = torch.ones(4, 5, dtype=torch.bool)
        mask[torch.arange(4), exclude] = False
        assert len(set(slots.tolist())) == 5  # distinct slots
        assert mask.sum(1).tolist() == [4, 4, 4, 4]  # exactly |D_N| per row
        for row, own in enumerate(indices.tolist()):
            chosen = slots[mask[row]].tolist()
            assert own not in chosen
            counts[row, chosen] += 1
    for row, own in enumerate(indices.tolist()):
        assert counts[row, own] == 0
        others = torch.cat([counts[row, :own], counts[row, own + 1 :]]) / trials
        # each of the 11 other slots is a negative with probability 4/11 (binomial sd ~0.009)
        assert torch.allclose(others, torch.full_like(others, 4 / 11), atol=0.04), others


def test_negatives_at_the_cap_are_every_other_slot():
    bank = MemoryBank(7, 2)
    indices = torch.tensor([6, 0, 3])
    slots, exclude = bank.sample_negatives(indices, 6)
    mask = torch.ones(len(indices), 7, dtype=torch.bool)
    mask[torch.arange(len(indices)), exclude] = False
    for row, own in enumerate(indices.tolist()):
        assert sorted(slots[mask[row]].tolist()) == [i for i in range(7) if i != own]


def _ddp_updates(rank: int, world_size: int) -> torch.Tensor:
    bank = MemoryBank(16, 5, momentum=0.5, seed=0)  # same seed on every rank: no broadcast needed
    for step in range(3):
        indices = torch.tensor([(4 * step + 2 * rank) % 16, (4 * step + 2 * rank + 1) % 16])
        bank.update(indices, _unit_rows(2, 5, seed=100 * step + rank))
    return bank.bank


def test_banks_identical_on_two_gloo_ranks():
    banks = run_distributed(_ddp_updates, 2)
    assert torch.equal(banks[0], banks[1])
    # The same updates applied one rank's slice after the other in this process.
    expected = MemoryBank(16, 5, seed=0).bank.clone()
    for step in range(3):
        for rank in range(2):
            emb = _unit_rows(2, 5, seed=100 * step + rank)
            for k, slot in enumerate([(4 * step + 2 * rank) % 16, (4 * step + 2 * rank + 1) % 16]):
                expected[slot] = torch.tensor(_ema_row(expected[slot].tolist(), emb[k].tolist(), 0.5))
    torch.testing.assert_close(banks[0], expected)


def test_checkpoint_round_trip():
    bank = MemoryBank(20, 6, seed=0)
    bank.update(torch.arange(5), _unit_rows(5, 6, seed=3))
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    restored = MemoryBank(20, 6, seed=9)
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored.bank, bank.bank)


def test_placement_flag_and_fp32():
    holder = nn.Module()
    holder.gpu_like, holder.host = MemoryBank(8, 2), MemoryBank(8, 2, on_cpu=True)
    holder.to(torch.float64)
    assert holder.gpu_like.bank.dtype == torch.float32 and holder.host.bank.dtype == torch.float32
    holder.to("meta")  # stands in for an accelerator: the flagged bank stays in host memory
    assert holder.gpu_like.bank.device.type == "meta" and holder.host.bank.device.type == "cpu"
    torch.testing.assert_close(holder.host.get(torch.tensor([1, 3])), holder.host.bank[[1, 3]])


def test_many_repeated_indices_each_take_their_first_occurrence():
    bank = MemoryBank(10, 3, momentum=0.4, seed=0)
    old = bank.bank.clone()
    indices = [4, 1, 4, 9, 1, 4, 0]
    emb = _unit_rows(len(indices), 3, seed=2)
    bank.update(torch.tensor(indices), emb)
    for slot in set(indices):
        first = indices.index(slot)  # the reference: a plain search for the first position
        expected = torch.tensor(_ema_row(old[slot].tolist(), emb[first].tolist(), 0.4))
        torch.testing.assert_close(bank.bank[slot], expected)
