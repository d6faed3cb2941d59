"""Each method's training step against an independent computation of what the step must do.

The pure parts (losses, queue, bank, momentum update) have their own formula tests; these check the wiring
inside the methods: which tensors feed the loss, in which order state is read and written, which settings
reach which part. Every expected value is computed here from the model's parts and written-out formulas.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sslpipe.masking import patchify
from sslpipe.methods import PIRL, DenoisingAutoencoder, MaskedAutoencoder, MoCoV2, MoCoV3, SimCLR, SimMIM

RESNET = dict(backbone="resnet18", image_size=16, proj_hidden_dim=32, proj_output_dim=16, num_classes=10)
VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs={"patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 3},
    image_size=16,
)


def _views(n=8, seed=0, count=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(count)]


def _ce_loop(queries, candidates, positive_index, tau, excluded=None) -> float:
    """Mean over rows of -log softmax(cos(q_i, c_j) / tau)[positive] over allowed j, in float64 loops."""
    q = F.normalize(queries.detach().double(), dim=1)
    c = F.normalize(candidates.detach().double(), dim=1)
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ c[j]) / tau for j in range(len(c)) if excluded is None or j != excluded[i]]
        pos = float(q[i] @ c[positive_index[i]]) / tau
        total += -pos + math.log(sum(math.exp(v) for v in logits))
    return total / len(q)


def _v2(q, k, queue, tau) -> float:
    """MoCo v2's InfoNCE: positive = own key, negatives = the queue rows, in float64 loops."""
    qn, kn, qu = F.normalize(q.detach().double(), dim=1), F.normalize(k.double(), dim=1), queue.double()
    total = 0.0
    for i in range(len(qn)):
        pos = float(qn[i] @ kn[i]) / tau
        negs = [float(qn[i] @ qu[j]) / tau for j in range(len(qu))]
        total += -pos + math.log(math.exp(pos) + sum(math.exp(v) for v in negs))
    return total / len(qn)


# ---------------------------------------------------------------------------------------------- SimCLR
def test_simclr_step_is_nt_xent_of_one_joint_pass_with_the_configured_temperature():
    torch.manual_seed(0)
    model = SimCLR(temperature=0.37, **RESNET)
    x1, x2 = _views()
    ref = copy.deepcopy(model)
    z = ref.projector(ref.backbone(torch.cat([x1, x2])))  # BatchNorm over both views together, as in the paper
    n = len(x1)
    # anchor i (view 1) pairs with i + n (view 2) and back; a view is never its own negative
    expected = _ce_loop(z, z, [(i + n) % (2 * n) for i in range(2 * n)], 0.37, excluded=list(range(2 * n)))
    out = model.ssl_step([x1, x2], torch.arange(n))
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(out.features, ref.backbone(torch.cat([x1, x2]))[:n])


# ---------------------------------------------------------------------------------------------- MoCo v2
def _moco_v2(**kwargs):
    torch.manual_seed(0)
    return MoCoV2(**{**RESNET, "queue_size": 24, "shuffle_bn": False, "temperature": 0.3, **kwargs})


def test_moco_v2_loss_uses_the_queue_before_this_step_then_enqueues_the_keys():
    model = _moco_v2()
    x1, x2 = _views()
    ptr = int(model.queue.ptr)
    queue_before = model.queue.queue.clone()
    ref = copy.deepcopy(model)
    q = ref.projector(ref.backbone(x1))
    k = F.normalize(ref.key_encoder(x2), dim=1)
    out = model.ssl_step([x1, x2])
    assert float(out.loss.detach()) == pytest.approx(_v2(q, k, queue_before, 0.3), rel=1e-5)
    # the keys (not the queries) now fill the rows after the old pointer; the rest is untouched
    torch.testing.assert_close(model.queue.queue[ptr : ptr + 8], k.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.queue.queue[ptr + 8 :], queue_before[ptr + 8 :])
    assert int(model.queue.ptr) == ptr + 8


def test_moco_v2_symmetric_adds_the_swapped_pair_against_the_same_queue_and_enqueues_both_keys():
    model = _moco_v2(symmetric=True)
    x1, x2 = _views()
    ptr = int(model.queue.ptr)
    queue_before = model.queue.queue.clone()
    ref = copy.deepcopy(model)
    q1, q2 = (ref.projector(ref.backbone(x)) for x in (x1, x2))
    k1, k2 = (F.normalize(ref.key_encoder(x), dim=1) for x in (x1, x2))
    out = model.ssl_step([x1, x2])
    expected = _v2(q1, k2, queue_before, 0.3) + _v2(q2, k1, queue_before, 0.3)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    # [k(view 1), k(view 2)] fill the 16 rows after the old pointer, in that order
    torch.testing.assert_close(model.queue.queue[ptr : ptr + 16], torch.cat([k1, k2]).float(), atol=1e-6, rtol=1e-5)
    assert int(model.queue.ptr) == (ptr + 16) % model.queue.size


def test_moco_v2_keys_come_back_in_input_order_after_shuffle_bn():
    model = _moco_v2(shuffle_bn=True, bn_splits=2)
    x = _views(count=1)[0]
    # In eval mode BatchNorm uses running statistics, so a key no longer depends on its sub-batch:
    # whatever the shuffle did, key i must be image i's key.
    model.key_encoder.eval()
    torch.testing.assert_close(model.keys(x), F.normalize(model.key_encoder(x), dim=1))
    # In training mode the shuffle regroups images into other sub-batches than a plain split would.
    model.key_encoder.train()
    torch.manual_seed(1)
    plain_split = F.normalize(torch.cat([model.key_encoder(c) for c in x.chunk(2)]), dim=1)
    assert not torch.allclose(model.keys(x), plain_split, atol=1e-4)


def test_moco_v2_queries_normalise_in_bn_split_groups():
    model = _moco_v2(bn_splits=2)
    x1, x2 = _views()
    ref = copy.deepcopy(model)
    q = torch.cat([ref.projector(ref.backbone(c)) for c in x1.chunk(2)])
    k = F.normalize(torch.cat([ref.key_encoder(c) for c in x2.chunk(2)]), dim=1)
    queue = model.queue.queue.clone()
    assert float(model.ssl_step([x1, x2]).loss.detach()) == pytest.approx(_v2(q, k, queue, 0.3), rel=1e-5)


# ---------------------------------------------------------------------------------------------- MoCo v3
def test_moco_v3_step_is_the_symmetric_loss_scaled_by_two_tau():
    torch.manual_seed(0)
    model = MoCoV3(**{**RESNET, "pred_hidden_dim": 32, "temperature": 0.4})
    x1, x2 = _views()
    ref = copy.deepcopy(model)
    q1, q2 = (ref.predictor(ref.projector(ref.backbone(x))) for x in (x1, x2))
    k1, k2 = (ref.key_encoder(x) for x in (x1, x2))
    own = list(range(len(x1)))
    expected = 2 * 0.4 * (_ce_loop(q1, k2, own, 0.4) + _ce_loop(q2, k1, own, 0.4))
    assert float(model.ssl_step([x1, x2]).loss.detach()) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------- PIRL
def test_pirl_step_loss_from_the_bank_before_the_update_and_the_configured_bank_momentum():
    torch.manual_seed(0)
    model = PIRL(
        num_samples=20,
        proj_output_dim=8,
        tile_dim=4,
        loss_form="infonce",
        temperature=0.2,
        num_negatives=5,
        bank_momentum=0.3,
        loss_weight=0.25,
        backbone="resnet18",
        image_size=16,
        num_classes=10,
    )
    g = torch.Generator().manual_seed(0)
    images, tiles = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 9, 3, 8, 8, generator=g)
    indices = torch.tensor([3, 7, 11, 0])
    bank_before = model.memory.bank.clone()
    slots = torch.tensor([1, 3, 5, 9, 13, 19])  # the shared draw; row 0 (image 3) drops slot 3, the others the last
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 1] = False
    mask[1:, -1] = False
    model.memory.sample_negatives = lambda idx, num: (slots, torch.tensor([1, 5, 5, 5]))
    ref = copy.deepcopy(model)
    image_emb = ref.head_f(ref.backbone(images))
    tile_emb = ref.tile_head(ref.backbone(tiles.flatten(0, 1))).reshape(4, -1)
    jigsaw_emb = ref.head_g(tile_emb)
    positives, negatives = bank_before[indices], bank_before[slots]

    def infonce(query):
        qn = F.normalize(query.detach().double(), dim=1)
        total = 0.0
        for b in range(4):
            pos = math.exp(float(qn[b] @ positives[b].double()) / 0.2)
            neg = sum(math.exp(float(qn[b] @ negatives[j].double()) / 0.2) for j in range(6) if mask[b, j])
            total += -math.log(pos / (pos + neg))
        return total / 4

    expected = 0.25 * infonce(jigsaw_emb) + 0.75 * infonce(image_emb)
    out = model.ssl_step([images, tiles, torch.zeros(4)], indices)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    mixed = 0.3 * bank_before[indices] + 0.7 * F.normalize(image_emb.detach(), dim=1)
    torch.testing.assert_close(model.memory.bank[indices], F.normalize(mixed, dim=1), atol=1e-5, rtol=1e-5)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(model.memory.bank[untouched], bank_before[untouched])


# ---------------------------------------------------------------------------------------------- masked models
def _masked_step(model, images):
    """(loss of ssl_step, the prediction the step made) under the same random stream."""
    torch.manual_seed(5)
    loss = model.ssl_step([images]).loss
    torch.manual_seed(5)
    return loss, model.predict(images)


def test_mae_loss_is_mse_on_hidden_patches_only_with_norm_pix_and_the_configured_ratio():
    torch.manual_seed(0)
    model = MaskedAutoencoder(
        mask_ratio=0.5, norm_pix_loss=True, decoder_dim=32, decoder_depth=1, decoder_heads=2, **VIT
    )
    images = _views(n=4, count=1)[0]
    loss, pred = _masked_step(model, images)
    assert pred.mask.sum(1).tolist() == [8.0] * 4  # half of the 16 patches hidden in every image
    target = patchify(images, 4)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()  # MAE's per-patch standardisation
    per_patch = ((pred.patches - target) ** 2).mean(-1)
    expected = (per_patch * pred.mask).sum() / pred.mask.sum()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_simmim_loss_is_l1_on_hidden_patches_with_the_configured_ratio():
    torch.manual_seed(0)
    model = SimMIM(mask_ratio=0.25, mask_block_size=1, **VIT)
    images = _views(n=4, count=1)[0]
    loss, pred = _masked_step(model, images)
    assert pred.mask.sum(1).tolist() == [4.0] * 4
    per_patch = (pred.patches - patchify(images, 4)).abs().mean(-1)
    assert float(loss.detach()) == pytest.approx(float((per_patch * pred.mask).sum() / pred.mask.sum()), rel=1e-5)


def test_dae_loss_is_mse_against_the_clean_image_on_every_patch():
    torch.manual_seed(0)
    model = DenoisingAutoencoder(noise_std=0.7, **VIT)
    images = _views(n=4, count=1)[0]
    loss, pred = _masked_step(model, images)
    assert pred.mask is None
    # the model was shown the noisy image ...
    assert (pred.corrupted - patchify(images, 4)).std() == pytest.approx(0.7, rel=0.1)
    # ... and is scored against the clean one
    assert float(loss.detach()) == pytest.approx(float(((pred.patches - patchify(images, 4)) ** 2).mean()), rel=1e-5)
