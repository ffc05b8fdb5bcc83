"""`python -m talr` / `talr`: LightningCLI for fit/validate/test/predict, plus the project's own subcommands.

    python -m talr fit --config configs/quickstart.yaml
    python -m talr fit --config configs/quickstart.yaml --model talr.methods.TALR --model.init_args.lr 5e-6
    python -m talr average --init builtin:SmolLM2-135M-Instruct --finetuned runs/x/hf --alphas 0.25,0.5
    python -m talr evaluate --model runs/x/hf --tasks ifeval,gsm8k --limit 20
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from lightning.pytorch.cli import LightningCLI

from talr.data.datamodule import DomainDataModule
from talr.methods.sft import SFT

# Subcommands that are not Trainer entry points: name -> "module:function(argv)".
EXTRA_COMMANDS = {
    "average": "talr.averaging:main",
    "evaluate": "talr.general.cli:main",
    "report": "talr.report:main",
    "analyze": "talr.analysis:main",
}


class TalrCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One model name configures both the weights and the DataModule's tokenizer.
        parser.link_arguments("model.init_args.pretrained", "data.tokenizer")
        parser.link_arguments("model.init_args.trust_remote_code", "data.trust_remote_code")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            parser.set_defaults(weights_only=True)  # checkpoints hold tensors and plain data only
        return parser


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("TALR_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in EXTRA_COMMANDS:
        module, func = EXTRA_COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module), func)(argv[1:])
        return
    TalrCLI(
        SFT,
        DomainDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=None if from_command_line else argv,
        parser_kwargs={"env_prefix": "TALR", "default_env": False, "allow_abbrev": False},
    )


if __name__ == "__main__":
    main()
