"""``sslpipe pretrain``: a LightningCLI over every :class:`~sslpipe.methods.SSLMethod` and the shared DataModule.

``--config`` files (several are applied in order), dotted overrides such as ``--model.backbone resnet50``
and ``--print_config`` work as in any LightningCLI. The run gets its own directory with ``config.yaml``,
checkpoints, logs and ``metrics.json``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional, Sequence


def _pretrain_cli_class():
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.cli import LightningCLI

    from sslpipe.callbacks import RepresentationDiagnostics, RunSummary
    from sslpipe.monitor import DataWaitMonitor
    from sslpipe.runs import RunOptions, build_loggers, make_run_dir

    class PretrainCLI(LightningCLI):
        """LightningCLI with sslpipe's run directory, default loggers and checkpoints."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(RunOptions, "run")
            # RankMe, uniformity, alignment, energies every N epochs; collapse warns or stops (--diagnostics.*).
            parser.add_class_arguments(RepresentationDiagnostics, "diagnostics")
            parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="Resume from this checkpoint.")
            # The data knows the image size and label count; the model is told, never configured twice.
            parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")
            # The probe learns the pretraining images' labels: 0 classes (unlabeled data) means no probe.
            parser.link_arguments("data.pretrain_num_classes", "model.init_args.num_classes", apply_on="instantiate")

        def before_instantiate_classes(self) -> None:
            cfg = self.config
            module, _, name = cfg.model.class_path.rpartition(".")
            self.method_name = getattr(importlib.import_module(module), name).method_label()
            self.run_dir = make_run_dir(
                cfg.trainer.default_root_dir, ["pretrain", self.method_name, cfg.data.dataset], cfg.run.name
            )
            cfg.trainer.default_root_dir = self.run_dir

        def instantiate_trainer(self, **kwargs: Any):
            cfg, init = self.config, self.config_init
            run_name = os.path.basename(self.run_dir)
            user_logger = init.trainer.get("logger")
            logger = (
                user_logger
                if user_logger not in (None, True)
                else build_loggers(self.run_dir, RunOptions(**cfg.run.as_dict()), run_name)
            )
            monitor = "val/online_linear_top1" if getattr(self.model, "probe", None) is not None else None
            checkpoint = ModelCheckpoint(
                dirpath=os.path.join(self.run_dir, "checkpoints"),
                filename="best",
                monitor=monitor,
                mode="max",
                save_top_k=1 if monitor else 0,
                save_last=True,
                enable_version_counter=False,
            )
            callbacks = list(init.trainer.get("callbacks") or [])
            callbacks += [checkpoint, RunSummary(self.run_dir, self.method_name, cfg.data.dataset), DataWaitMonitor()]
            diagnostics = RepresentationDiagnostics(**cfg.diagnostics.as_dict())
            if diagnostics.every_n_epochs > 0:
                callbacks.append(diagnostics)
            if logger:
                callbacks.append(LearningRateMonitor(logging_interval="epoch"))
            return super().instantiate_trainer(logger=logger or False, callbacks=callbacks, **kwargs)

    return PretrainCLI


def main(argv: Sequence[str]) -> str:
    """Run self-supervised pretraining from a config and overrides; returns the run directory."""
    from pytorch_lightning.utilities import rank_zero_only

    import sslpipe.methods  # noqa: F401  registers every method as a subclass of SSLMethod
    from sslpipe.data import SSLDataModule
    from sslpipe.methods import SSLMethod
    from sslpipe.runs import finish_loggers

    cli = _pretrain_cli_class()(
        SSLMethod,
        SSLDataModule,
        subclass_mode_model=True,
        run=False,
        args=list(argv),
        save_config_callback=None,
        auto_configure_optimizers=False,
        # Defaults every config shares, stated once here instead of in 23 YAML files.
        seed_everything_default=0,
        # benchmark: cuDNN picks the fastest convolution algorithms for the fixed input shapes (GPU only).
        trainer_defaults={"default_root_dir": "runs", "benchmark": True},
        parser_kwargs={"prog": "sslpipe pretrain", "description": "Self-supervised pretraining."},
    )
    if rank_zero_only.rank == 0:
        with open(os.path.join(cli.run_dir, "config.yaml"), "w") as f:
            f.write(cli.parser.dump(cli.config, skip_none=False))
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    finally:
        finish_loggers(cli.trainer.loggers)
    return cli.run_dir
