"""PIRL (Misra & van der Maaten, 2020): embeddings invariant to a jigsaw shuffle, negatives from a memory bank."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from sslpipe.augment.jigsaw import NUM_TILES
from sslpipe.distributed import gather_no_grad
from sslpipe.heads import mlp
from sslpipe.losses import DEFAULT_BLOCK, ContrastiveBlock
from sslpipe.losses.pirl import PIRLLoss, PIRLLossForm, estimate_nce_log_z
from sslpipe.memory.bank import MemoryBank
from sslpipe.methods.base import SSLMethod, SSLOutput, check_method_sizes


class PIRL(SSLMethod):
    """PIRL: pull ``f(v_I)`` and ``g(v_{I^t})`` towards the memory ``m_I`` of their image, away from other slots.

    ``f`` projects the backbone features of the image view; ``g`` projects each tile's features
    (``tile_dim`` each), concatenates the 9 in the order they arrive (the permutation's) and projects
    the result. The bank slot ``m_I`` is an EMA of ``f(v_I)``.

    Args:
        num_samples: memory-bank slots = pretraining images; ``None`` reads it from the datamodule in
            ``setup()`` and records it in the hyper-parameters so checkpoints rebuild the bank.
        proj_output_dim: width ``d`` of ``f``, ``g`` and the bank (PIRL: 128).
        tile_dim: per-tile projection width before concatenation (PIRL: 128).
        proj_hidden_dim: hidden width when ``proj_num_layers > 1``.
        proj_num_layers: Linear layers of ``f`` and of the per-tile head (PIRL: 1, linear).
        loss_form: ``nce`` (PIRL's noise-contrastive loss) or ``infonce``.
        temperature: ``tau`` (PIRL: 0.07).
        num_negatives: ``|D_N|`` per image (PIRL: 32000), capped at ``|D| - 1``.
        bank_momentum: EMA coefficient ``alpha`` of the bank (PIRL: 0.5).
        loss_weight: ``lambda``, weight of the jigsaw term (PIRL: 0.5).
        bank_on_cpu: keep the bank in host memory (ImageNet-scale banks next to a large model).
        bank_seed: seed of the bank's random unit-vector initialisation (identical on every rank).
        **kwargs: the shared :class:`SSLMethod` arguments (backbone, optimiser, schedule, probe).
    """

    def __init__(
        self,
        num_samples: Optional[int] = None,
        proj_output_dim: int = 128,
        tile_dim: int = 128,
        proj_hidden_dim: int = 2048,
        proj_num_layers: int = 1,
        loss_form: PIRLLossForm = "nce",
        temperature: float = 0.07,
        num_negatives: int = 32000,
        bank_momentum: float = 0.5,
        loss_weight: float = 0.5,
        bank_on_cpu: bool = False,
        bank_seed: int = 0,
        contrastive_block: ContrastiveBlock = DEFAULT_BLOCK,
        **kwargs: Any,
    ) -> None:
        check_method_sizes(
            temperature=temperature,
            proj_output_dim=proj_output_dim,
            tile_dim=tile_dim,
            proj_hidden_dim=proj_hidden_dim,
            proj_num_layers=proj_num_layers,
            num_negatives=num_negatives,
        )
        super().__init__(**kwargs)
        self.head_f = mlp(self.feature_dim, proj_hidden_dim, proj_output_dim, proj_num_layers)
        self.tile_head = mlp(self.feature_dim, proj_hidden_dim, tile_dim, proj_num_layers)
        self.head_g = nn.Linear(NUM_TILES * tile_dim, proj_output_dim)
        self.criterion = PIRLLoss(loss_form, temperature, loss_weight, block=contrastive_block)
        # log Z of the NCE form, estimated on the first batch; NaN until then. A buffer: checkpointed.
        self.register_buffer("nce_log_z", torch.tensor(float("nan")))
        self._z_ready = False
        self.memory: Optional[MemoryBank] = None
        if num_samples is not None:
            self._build_memory(num_samples)
        # Every rank applies every update, so the banks agree without DDP re-broadcasting them each step.
        self.ignore_in_ddp("memory.bank")

    def _build_memory(self, num_samples: int) -> None:
        hp = self.hparams
        self.memory = MemoryBank(num_samples, hp.proj_output_dim, hp.bank_momentum, hp.bank_on_cpu, hp.bank_seed)

    @property
    def num_negatives_used(self) -> int:
        """``|D_N|``: the configured count capped at the bank's other slots."""
        return min(self.hparams.num_negatives, self.memory.size - 1)

    def setup(self, stage: str) -> None:
        """Build the bank from the datamodule's image count (before Lightning restores a checkpoint)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        n = getattr(datamodule, "num_train_samples", None)
        if self.memory is None:
            if n is None:
                raise ValueError(
                    "PIRL's memory bank needs the number of training images: use SSLDataModule or set model.num_samples"
                )
            self.hparams["num_samples"] = n  # checkpoints then rebuild the bank (load_method)
            self._build_memory(n)
        elif n is not None and n != self.memory.size:
            raise ValueError(
                f"model.num_samples={self.memory.size} but the pretraining data has {n} images; drop model.num_samples"
            )
        if stage == "fit" and self.hparams.num_negatives > self.num_negatives_used:
            rank_zero_info(
                f"PIRL: num_negatives={self.hparams.num_negatives} exceeds the {self.num_negatives_used} other images "
                f"in the memory bank; using {self.num_negatives_used}"
            )

    def _log_z(self, queries: torch.Tensor, negatives: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
        """Z is estimated once, from the first batch, averaged over ranks so every rank uses the same Z."""
        if not self._z_ready:
            if torch.isnan(self.nce_log_z):
                local = estimate_nce_log_z(queries, negatives, self.memory.size, self.criterion.temperature, exclude)
                per_rank = gather_no_grad(local.reshape(1))
                self.nce_log_z.copy_(torch.logsumexp(per_rank, 0) - math.log(per_rank.numel()))
            self._z_ready = True
        return self.nce_log_z

    def ssl_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> SSLOutput:
        """NCE/InfoNCE of ``g(jigsaw)`` and ``f(image)`` against the bank, then the bank's EMA update."""
        if len(views) < 2 or views[1].ndim != 5 or views[1].shape[1] != NUM_TILES:
            raise ValueError(
                "PIRL needs [image (B,3,S,S), tiles (B,9,3,t,t), ...] views; "
                "use data.views: sslpipe.augment.JigsawViews"
            )
        if self.memory is None:
            raise RuntimeError(
                "PIRL's memory bank is not built: pass model.num_samples or train through a Trainer with SSLDataModule"
            )
        images, tiles = views[0], views[1]
        b = images.shape[0]
        features = self.encode(images)
        image_emb = self.head_f(features)
        tile_emb = self.tile_head(self.encode(tiles.flatten(0, 1)))
        jigsaw_emb = self.head_g(tile_emb.reshape(b, NUM_TILES * tile_emb.shape[1]))

        positive = self.memory.get(indices)
        slots, exclude = self.memory.sample_negatives(indices, self.num_negatives_used)
        negatives = self.memory.get(slots).to(images.device)
        log_z = None
        if self.criterion.form == "nce":
            queries = torch.cat([jigsaw_emb, image_emb]).detach()
            log_z = self._log_z(queries, negatives, torch.cat([exclude, exclude]))
        loss, jig, img, stats = self.criterion(
            jigsaw_emb, image_emb, positive, negatives, exclude, log_z, self.memory.size, return_stats=True
        )
        # The bank moves after the loss: m_I in this step's loss is the memory from earlier epochs.
        self.memory.update(indices, F.normalize(image_emb.detach().float(), dim=1))
        logs = {"loss_jigsaw": jig.detach(), "loss_image": img.detach(), **stats}
        return SSLOutput(loss=loss, features=features, logs=logs)
