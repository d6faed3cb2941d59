"""``sslpipe pretrain``: a LightningCLI over every :class:`~sslpipe.methods.SSLMethod` and the shared DataModule.

``--config`` files (several are applied in order), dotted overrides such as ``--model.backbone resnet50``
and ``--print_config`` work as in any LightningCLI. The run gets its own directory with ``config.yaml``,
checkpoints, logs and ``metrics.json``.

Resilience: every setting is checked when the config is read (constructors raise ``ConfigError``); checkpoints
are written every ``run.checkpoint_every_n_steps`` steps and on SIGTERM/SIGINT (then the process exits with
128 + the signal number); ``--ckpt_path last`` continues the run named by ``run.name`` (or ``SSLPIPE_RUN_ID`` /
``SLURM_JOB_ID``) from its newest checkpoint, exactly as if it had not stopped (:mod:`sslpipe.resume`), and
starts it fresh, with a warning, when it has none yet (so a SLURM script can always pass it). A non-finite
loss stops the run (``run.on_nan``) without overwriting the last good checkpoint.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any, Optional, Sequence


def _pretrain_cli_class():
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.cli import LightningCLI

    from sslpipe.callbacks import (
        GuardedCheckpoint,
        NonFiniteGuard,
        RepresentationDiagnostics,
        RunSummary,
        SaveOnInterrupt,
    )
    from sslpipe.monitor import DataWaitMonitor
    from sslpipe.runs import RunOptions, build_loggers, make_run_dir

    class PretrainCLI(LightningCLI):
        """LightningCLI with sslpipe's run directory, default loggers and checkpoints."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(RunOptions, "run")
            # RankMe, uniformity, alignment, energies every N epochs; collapse warns or stops (--diagnostics.*).
            parser.add_class_arguments(RepresentationDiagnostics, "diagnostics")
            parser.add_argument(
                "--ckpt_path",
                type=Optional[str],
                default=None,
                help="Resume from this checkpoint; 'last': the newest checkpoint of this run (run.name), if any.",
            )
            # The data knows the image size and label count; the model is told, never configured twice.
            parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")
            # The probe learns the pretraining images' labels: 0 classes (unlabeled data) means no probe.
            parser.link_arguments("data.pretrain_num_classes", "model.init_args.num_classes", apply_on="instantiate")

        def before_instantiate_classes(self) -> None:
            cfg = self.config
            self.run_options = RunOptions(**cfg.run.as_dict())  # bad run.* values stop here, before anything is built
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
                else build_loggers(self.run_dir, self.run_options, run_name, resuming=cfg.ckpt_path is not None)
            )
            monitor = "val/online_linear_top1" if getattr(self.model, "probe", None) is not None else None
            checkpoints_dir = os.path.join(self.run_dir, "checkpoints")
            checkpoint = GuardedCheckpoint(
                dirpath=checkpoints_dir,
                filename="best",
                monitor=monitor,
                mode="max",
                save_top_k=1 if monitor else 0,
                save_last=True,
                enable_version_counter=False,
            )
            callbacks = list(init.trainer.get("callbacks") or [])
            every = self.run_options.checkpoint_every_n_steps
            if every:  # last.ckpt also between validations: a crash loses at most `every` steps
                callbacks.append(
                    GuardedCheckpoint(
                        dirpath=checkpoints_dir,
                        save_top_k=0,
                        save_last=True,
                        every_n_train_steps=every,
                        enable_version_counter=False,  # both callbacks write the one last.ckpt, never last-v1.ckpt
                    )
                )
            callbacks += [
                checkpoint,
                RunSummary(self.run_dir, self.method_name, cfg.data.dataset),
                DataWaitMonitor(),
                NonFiniteGuard(self.run_options.on_nan),
                SaveOnInterrupt(self.run_dir),
            ]
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
    from pytorch_lightning.utilities.exceptions import SIGTERMException

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
    ckpt_path = resolve_ckpt_path(cli.config.ckpt_path, cli.run_dir)
    # The sampler resumes mid-epoch itself (sslpipe.resume), which Lightning cannot see.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        raise _interrupted(cli.trainer) from None
    finally:
        finish_loggers(cli.trainer.loggers)
    return cli.run_dir


def resolve_ckpt_path(ckpt_path: Optional[str], run_dir: str) -> Optional[str]:
    """``--ckpt_path``: ``last`` is the newest checkpoint of this run directory (fresh start with a warning when
    there is none yet, as on a SLURM job's first launch); anything else is passed to Lightning as is."""
    if ckpt_path != "last":
        return ckpt_path
    from sslpipe.resume import latest_checkpoint

    found = latest_checkpoint(run_dir)
    if found is None:
        warnings.warn(
            f"--ckpt_path last: no checkpoint in {run_dir!r} yet; starting this run from scratch", stacklevel=2
        )
    return found


def _interrupted(trainer: Any) -> BaseException:
    """The :class:`~sslpipe.callbacks.Interrupted` error for a run stopped by a signal (exit 128 + signal)."""
    import signal

    from sslpipe.callbacks import Interrupted, SaveOnInterrupt

    cb = next((c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt)), None)
    signum = (cb.signal if cb is not None else None) or signal.SIGTERM
    where = f"checkpoint saved to {cb.saved}" if cb is not None and cb.saved else "no checkpoint saved (no step done)"
    return Interrupted(
        f"interrupted by {signal.Signals(signum).name} at step {trainer.global_step}; {where}; continue with "
        f"--run.name {os.path.basename(os.path.normpath(trainer.default_root_dir))} --ckpt_path last",
        128 + int(signum),
    )
