"""PIRL: both loss forms against explicit formulas, learning on a fixed batch, pretrain -> kNN -> resume."""

import math

import pytest
import torch

from sslpipe.losses import PIRLLoss, estimate_nce_log_z, pirl_infonce_loss, pirl_nce_loss
from sslpipe.memory import MemoryBank
from sslpipe.methods import PIRL, load_method
from tests.helpers import TINY, read_metrics, run_cli, run_distributed


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _ref_z(queries, negatives, mask, tau, num_data):
    """Z = |D| * mean of exp(s/tau) over every (query, allowed negative) pair."""
    values = [math.exp(_cos(q, n) / tau) for b, q in enumerate(queries) for k, n in enumerate(negatives) if mask[b][k]]
    return num_data * sum(values) / len(values)


def _ref_nce(queries, positives, negatives, mask, tau, z, num_data):
    total = 0.0
    for b, q in enumerate(queries):
        k_b = sum(mask[b])

        def h(s, k_b=k_b):
            p = math.exp(s / tau) / z
            return p / (p + k_b / num_data)

        loss = -math.log(h(_cos(positives[b], q)))
        for k, n in enumerate(negatives):
            if mask[b][k]:
                loss -= math.log(1.0 - h(_cos(q, n)))
        total += loss
    return total / len(queries)


def _ref_infonce(queries, positives, negatives, mask, tau):
    total = 0.0
    for b, q in enumerate(queries):
        pos = math.exp(_cos(positives[b], q) / tau)
        neg = sum(math.exp(_cos(q, n) / tau) for k, n in enumerate(negatives) if mask[b][k])
        total += -math.log(pos / (pos + neg))
    return total / len(queries)


@pytest.fixture
def small_problem():
    g = torch.Generator().manual_seed(0)
    query, image, positive = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    negatives = torch.randn(6, 4, generator=g, dtype=torch.float64)
    exclude = torch.tensor([2, 5, -1])  # rows 0 and 1 drop a slot (their own index), row 2 none
    mask = [[k != int(exclude[b]) for k in range(6)] for b in range(3)]  # row b's D_N
    return query, image, positive, negatives, exclude, mask


@pytest.mark.parametrize("block", [None, 2])
def test_nce_loss_and_z_against_explicit_formula(small_problem, block):
    query, _, positive, negatives, exclude, mask = small_problem
    tau, num_data = 0.5, 40
    lists = [t.tolist() for t in (query, positive, negatives)] + [mask]
    z = _ref_z(lists[0], lists[2], lists[3], tau, num_data)
    log_z = estimate_nce_log_z(query, negatives, num_data, tau, exclude, block)
    assert float(log_z) == pytest.approx(math.log(z), rel=1e-5)
    loss = pirl_nce_loss(query, positive, negatives, math.log(z), num_data, tau, exclude, block)
    assert float(loss) == pytest.approx(_ref_nce(*lists, tau, z, num_data), rel=1e-5)
    # Without exclusions every row keeps all 6 negatives.
    full = [[True] * 6] * 3
    loss = pirl_nce_loss(query, positive, negatives, math.log(z), num_data, tau, block=block)
    assert float(loss) == pytest.approx(_ref_nce(lists[0], lists[1], lists[2], full, tau, z, num_data), rel=1e-5)


@pytest.mark.parametrize("block", [None, 4])
def test_infonce_loss_against_explicit_formula(small_problem, block):
    query, _, positive, negatives, exclude, mask = small_problem
    lists = [t.tolist() for t in (query, positive, negatives)] + [mask]
    loss = pirl_infonce_loss(query, positive, negatives, 0.3, exclude, block)
    assert float(loss) == pytest.approx(_ref_infonce(*lists, 0.3), rel=1e-5)


@pytest.mark.parametrize("form", ["nce", "infonce"])
def test_combined_loss_weights_the_two_terms(small_problem, form):
    query, image, positive, negatives, exclude, mask = small_problem
    tau, num_data, lam, z = 0.4, 30, 0.3, 25.0
    criterion = PIRLLoss(form, tau, lam, block=2)
    total, _, _ = criterion(query, image, positive, negatives, exclude, torch.tensor(math.log(z)), num_data)
    lists = [positive.tolist(), negatives.tolist(), mask]
    if form == "nce":
        ref = [_ref_nce(q.tolist(), *lists, tau, z, num_data) for q in (query, image)]
    else:
        ref = [_ref_infonce(q.tolist(), *lists, tau) for q in (query, image)]
    assert float(total) == pytest.approx(lam * ref[0] + (1 - lam) * ref[1], rel=1e-5)


@pytest.mark.parametrize("block", [None, 2])
def test_losses_are_stable_and_fp32_under_autocast(block):
    torch.manual_seed(0)
    v = torch.randn(1, 8)
    query = v.repeat(4, 1).bfloat16().requires_grad_()
    negatives = v.repeat(5, 1).bfloat16()  # identical to the query: s/tau = 1000, exp overflows fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nce = pirl_nce_loss(query, query.detach(), negatives, 0.0, 10, temperature=1e-3, block=block)
        info = pirl_infonce_loss(query, query.detach(), negatives, temperature=1e-3, block=block)
    assert nce.dtype == info.dtype == torch.float32
    assert torch.isfinite(nce) and torch.isfinite(info)
    assert float(info.detach()) == pytest.approx(math.log(6), rel=1e-4)  # 1 positive among 6 equal logits
    (nce + info).backward()
    assert torch.isfinite(query.grad.float()).all()


def _tiny_pirl(**kwargs) -> PIRL:
    return PIRL(num_samples=16, backbone="resnet10t", image_size=16, num_negatives=15, online_probe=False, **kwargs)


@pytest.mark.parametrize("form", ["nce", "infonce"])
def test_loss_falls_on_a_fixed_batch(form):
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 9, 3, 8, 8), torch.zeros(8, dtype=torch.long)]
    indices = torch.arange(3, 11)

    def train(lr: float):
        torch.manual_seed(0)
        model = _tiny_pirl(loss_form=form, temperature=0.2)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        losses = []
        for step in range(5):
            out = model.ssl_step(views, indices)
            optimizer.zero_grad()
            out.loss.backward()
            if step == 0:
                for head in (model.head_f, model.tile_head, model.head_g, model.backbone):
                    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
                log_z = model.nce_log_z.clone()
            optimizer.step()
            losses.append(float(out.loss.detach()))
        return model, losses, log_z

    model, losses, log_z = train(0.05)
    # The bank's EMA alone pulls m_I towards f(v_I) and lowers the loss; the network must do better than that.
    _, frozen, _ = train(0.0)
    assert frozen[0] == pytest.approx(losses[0])
    assert losses[-1] < 0.5 * frozen[-1], (losses, frozen)
    assert not model.memory.bank.requires_grad
    if form == "nce":  # Z is estimated on the first batch and then kept
        assert torch.isfinite(log_z) and torch.equal(model.nce_log_z, log_z)
    else:
        assert torch.isnan(model.nce_log_z)


def test_bank_slots_move_only_for_the_batch_and_views_are_checked():
    model = _tiny_pirl()
    before = model.memory.bank.clone()
    assert torch.equal(before, MemoryBank(16, 128, seed=0).bank)  # seeded like every rank
    indices = torch.tensor([1, 4, 9, 12])
    model.ssl_step([torch.randn(4, 3, 16, 16), torch.randn(4, 9, 3, 8, 8)], indices)
    changed = (model.memory.bank != before).any(1).nonzero().flatten().tolist()
    assert changed == indices.tolist()
    with pytest.raises(ValueError, match="JigsawViews"):
        model.ssl_step([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], indices)


def _ddp_steps(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)  # same weights and bank on both ranks
    model = _tiny_pirl()
    torch.manual_seed(1 + rank)  # different images, slots and negatives per rank
    for step in range(2):
        indices = torch.arange(4) + 8 * step + 4 * rank
        model.ssl_step([torch.randn(4, 3, 16, 16), torch.randn(4, 9, 3, 8, 8)], indices)
    return model.memory.bank, model.nce_log_z


def test_two_gloo_ranks_keep_identical_banks_and_z():
    (bank0, z0), (bank1, z1) = run_distributed(_ddp_steps, 2)
    assert torch.equal(bank0, bank1) and torch.equal(z0, z1) and torch.isfinite(z0)
    torch.manual_seed(0)
    initial = _tiny_pirl().memory.bank
    assert (bank0 != initial).any(1).nonzero().flatten().tolist() == list(range(16))  # both ranks' slots


def test_pretrain_knn_and_resume_on_digits(runs_dir, caplog):
    # The NCE form (the paper's, the library default) so that Z's estimate and checkpointing are exercised.
    args = [
        "pretrain",
        "--config",
        "configs/pirl/digits.yaml",
        "--trainer.default_root_dir",
        runs_dir,
        *TINY,
        "--model.loss_form",
        "nce",
        "--model.num_negatives",
        "32000",
        "--data.batch_size",
        "16",
        "--data.views.init_args.tile_size",
        "8",
    ]
    run_dir, _ = run_cli(args)
    assert "num_negatives=32000 exceeds the 1436 other images" in caplog.text  # the cap is logged
    metrics = read_metrics(run_dir)
    assert metrics["method"] == "pirl" and metrics["global_step"] == 3
    last = f"{run_dir}/checkpoints/last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["num_samples"] == 1437
    bank, log_z = ckpt["state_dict"]["memory.bank"], ckpt["state_dict"]["nce_log_z"]
    assert bank.shape == (1437, 128) and torch.isfinite(log_z)
    moved = (bank != MemoryBank(1437, 128, seed=0).bank).any(1).sum()
    assert moved == 3 * 16  # three batches of 16 images wrote their slots
    model = load_method(last)
    assert torch.equal(model.memory.bank, bank) and torch.equal(model.nce_log_z, log_z)

    eval_dir, _ = run_cli(
        ["knn", "--checkpoint", last, "--trainer.default_root_dir", runs_dir, "--data.eval_batch_size", "256"]
    )
    assert 0 <= read_metrics(eval_dir)["knn_top1"] <= 100

    # Resume: the bank is built in setup() before Lightning loads the checkpoint into it; Z is kept.
    resumed, _ = run_cli(
        [*args, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--ckpt_path", last]
    )
    assert read_metrics(resumed)["global_step"] == 5
    ckpt2 = torch.load(f"{resumed}/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert torch.equal(ckpt2["state_dict"]["nce_log_z"], log_z)
    moved_again = (ckpt2["state_dict"]["memory.bank"] != bank).any(1).sum()
    assert moved_again == 2 * 16  # two more batches
