"""The LightningCLI behind `talr fit|validate|test|predict` (talr.cli dispatches to it).

Beyond LightningCLI: the model name configures the tokenizer too; checkpoints load `weights_only`; no
sanity-check validation by default (the method's baseline already validates every example before the first
step, and the sanity check's "Sanity Checking" bar was taken for it); progress as log lines when stdout is
not a terminal (talr.progress_bar.LogProgress); parser errors as one message naming the key, with the closest
valid key (talr.cli_errors); and a run that fails before its first optimizer step leaves no empty log
directory (`version_N` holding only config.yaml/hparams.yaml) behind.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from talr.cli_errors import config_error_message, parser_keys
from talr.progress import is_terminal
from talr.progress_bar import LogProgress

log = logging.getLogger("talr.cli")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# What a run writes into its log directory before its first step; a failed run holding only these is removed.
EMPTY_RUN_FILES = ("config.yaml", "hparams.yaml", "metrics.csv")


class ConfigError(Exception):
    """A configuration the parser refused, as one message (talr.cli_errors)."""


class TalrCLI(LightningCLI):
    def __init__(self, *args, parser_kwargs: dict | None = None, trainer_defaults: dict | None = None, **kwargs):
        parser_kwargs = dict(parser_kwargs or {})
        parser_kwargs.setdefault("prog", "talr")
        parser_kwargs.setdefault("exit_on_error", False)  # errors come back as ArgumentError: said in one line
        for sub in SUBCOMMANDS:
            parser_kwargs.setdefault(sub, {}).setdefault("exit_on_error", False)
        trainer_defaults = {"num_sanity_val_steps": 0, **(trainer_defaults or {})}
        self._started = time.time()
        super().__init__(*args, parser_kwargs=parser_kwargs, trainer_defaults=trainer_defaults, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # One model name configures both the weights and the DataModule's tokenizer.
        parser.link_arguments("model.init_args.pretrained", "data.tokenizer")
        parser.link_arguments("model.init_args.trust_remote_code", "data.trust_remote_code")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            parser.set_defaults(weights_only=True)  # checkpoints hold tensors and plain data only
        return parser

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            import sys

            argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
            sub = next((a for a in argv if a in SUBCOMMANDS), None)
            subparser = getattr(self, "_subcommand_parsers", {}).get(sub)
            keys = parser_keys(subparser) if subparser is not None else parser_keys(parser)
            raise ConfigError(config_error_message(str(err), keys, argv)) from err

    def before_instantiate_classes(self) -> None:
        name_run_after_method(self.config.get(self.subcommand) if self.subcommand else self.config)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

        configured = [*(config.get("callbacks") or []), *callbacks]
        if (config.get("enable_progress_bar") is not False and not is_terminal()
                and not any(isinstance(c, ProgressBar) for c in configured)):
            callbacks = [*callbacks, LogProgress()]  # TQDM's bar on a buffered, redrawn stdout shows only at the end
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if subcommand != "fit" or self.trainer.global_step == 0:
                remove_empty_log_dirs(self.trainer, self._started)
            raise


def name_run_after_method(config) -> None:
    """A CSV/TensorBoard logger left at its default name ("lightning_logs") is named after the method, in lower
    case (`runs/quickstart/talr/version_0` under a TALR overlay); a name the user set is kept."""
    from jsonargparse import Namespace

    logger, model = config.get("trainer", Namespace()).get("logger"), config.get("model")
    if not isinstance(logger, Namespace) or not isinstance(model, Namespace) or not model.get("class_path"):
        return
    init_args = logger.get("init_args")
    if str(logger.get("class_path")).rsplit(".", 1)[-1] in ("CSVLogger", "TensorBoardLogger") and init_args is not None \
            and init_args.get("name") == "lightning_logs":
        init_args.name = model.class_path.rsplit(".", 1)[-1].lower()


def remove_empty_log_dirs(trainer, since: float) -> list[Path]:
    """After a failure before any result: delete what the loggers wrote (config.yaml, hparams.yaml, a
    header-only metrics.csv, TensorBoard event files) and the directory if that leaves it empty. Files older
    than the run, and any other file, are kept (and so is the directory). Rank 0 only."""
    if not trainer.is_global_zero:
        return []
    removed = []
    for logger in trainer.loggers:
        try:
            log_dir = getattr(logger, "log_dir", None)
        except Exception:  # a logger that cannot even name its directory wrote nothing
            continue
        if not log_dir or not Path(log_dir).is_dir():
            continue
        path = Path(log_dir)
        files = [p for p in path.rglob("*") if p.is_file()]
        removable = [p for p in files if p.stat().st_mtime >= since - 1 and _is_run_debris(p)]
        if len(removable) != len(files):
            continue
        for p in removable:
            p.unlink()
        for d in sorted((d for d in path.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            d.rmdir()
        path.rmdir()
        removed.append(path)
        root = Path(getattr(logger, "save_dir", None) or path).resolve()
        parent = path.resolve().parent  # `<save_dir>/<name>/` made for this version: remove it too if empty
        while parent != root.parent and root in (parent, *parent.parents) and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
        log.info("removed %s: the run failed before writing any result", path)
    return removed


def _is_run_debris(path: Path) -> bool:
    if path.name.startswith("events.out.tfevents."):
        return True
    if path.name == "metrics.csv":
        return len(path.read_text().splitlines()) <= 1
    return path.name in EMPTY_RUN_FILES
