"""`talr` / `python -m talr`: LightningCLI for fit/validate/test/predict, plus the project's own subcommands.

    talr fit --config configs/quickstart.yaml
    talr fit --config configs/quickstart.yaml --model talr.methods.TALR --model.init_args.lr 5e-6
    talr average --init builtin:SmolLM2-135M-Instruct --finetuned runs/x/hf --alphas 0.25,0.5
    talr evaluate --model runs/x/hf --tasks ifeval,gsm8k --limit 20

Errors a user can fix (bad data, an unknown or mistyped config key, a missing file, no network) are printed
as one message with exit status 1 (2 for configuration errors); `--debug` or `TALR_DEBUG=1` shows the
traceback instead. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import os

# The OpenMP runtime torch loads reads OMP_WAIT_POLICY once, when torch is imported: set it before that.
# PASSIVE: idle OpenMP threads sleep instead of spinning, which on a shared or small CPU otherwise steals the
# cores the next operation needs (a GPU run does not care). The user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

TRAINER_COMMANDS = {
    "fit": "train a model (e.g. talr fit --config configs/quickstart.yaml)",
    "validate": "score a model or a checkpoint on the validation split",
    "test": "score a model or a checkpoint on the test split",
    "predict": "generate answers for the test split",
}
# Subcommands that are not Trainer entry points: name -> ("module:function(argv)", help).
EXTRA_COMMANDS = {
    "average": ("talr.averaging:main", "WiSE-FT: interpolate initial and fine-tuned weights (θ_α = (1-α)θ0 + αθ)"),
    "evaluate": ("talr.general.cli:main", "general-skill scores (IFEval, GSM8K, HumanEval via lm-eval) of a model"),
    "report": ("talr.report:main", "the paper's tables and a Pareto plot from runs' summary.json files"),
    "analyze": ("talr.analysis:main", "per-token probability profile of a training set under a model"),
}
HELP = """usage: talr <command> [options]        (or: python -m talr <command> [options])

Fine-tune LLMs on a domain without losing general skill: SFT, L2-to-init, LoRA, WiSE-FT, FLOW, TALR.

training (LightningCLI: --config YAML files and --key value flags):
{trainer}

tools:
{extra}

`talr <command> --help` lists a command's options. --debug (or TALR_DEBUG=1) shows tracebacks.
"""


def help_text() -> str:
    rows = lambda commands: "\n".join(f"  {name:<10} {text if isinstance(text, str) else text[1]}"  # noqa: E731
                                      for name, text in commands.items())
    return HELP.format(trainer=rows(TRAINER_COMMANDS), extra=rows(EXTRA_COMMANDS))


def _environment() -> None:
    """Defaults that keep talr's writes under the run directory and $TALR_CACHE, and logs readable."""
    cache = Path(os.environ.get("TALR_CACHE", Path.home() / ".cache" / "talr")).expanduser()
    os.environ.setdefault("MPLCONFIGDIR", str(cache / "matplotlib"))  # not ~/.config/matplotlib
    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):
        terminal = False
    if not terminal:  # tqdm bars (tokenising, lm-eval) in a log: a state every 30 s, not every 0.1 s
        os.environ.setdefault("TQDM_MININTERVAL", "30")


def _fail(command: str, message: str, code: int) -> None:
    print(f"talr {command}: error: {message}", file=sys.stderr)
    if code != 2:
        print("(run with --debug or TALR_DEBUG=1 for the traceback)", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None, *, friendly_errors: bool | None = None) -> int | None:
    """Run a talr command. `friendly_errors` (default: on when run from the command line, off for a call with
    an explicit `argv`, so callers get the exception): print a user's error as one message and exit."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TALR_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    friendly = (from_command_line if friendly_errors is None else friendly_errors) and not debug
    logging.basicConfig(level=os.environ.get("TALR_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    _environment()
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text())
        if not argv:
            raise SystemExit(2)
        return 0
    command = argv[0]
    try:
        if command in EXTRA_COMMANDS:
            module, func = EXTRA_COMMANDS[command][0].split(":")
            return getattr(importlib.import_module(module), func)(argv[1:])
        if command not in TRAINER_COMMANDS and not command.startswith("-"):
            from talr.cli_errors import closest

            guess = closest(command, [*TRAINER_COMMANDS, *EXTRA_COMMANDS])
            _fail(command, f"unknown command {command!r}" + (f"; did you mean {guess!r}?" if guess else "")
                  + "\n" + help_text(), 2)
        if from_command_line:
            sys.argv = [sys.argv[0], *argv]  # without --debug; LightningCLI reads sys.argv itself
        return _run_trainer(None if from_command_line else argv)
    except SystemExit:
        raise
    except BaseException as err:
        from talr.trainer_cli import ConfigError

        if isinstance(err, ConfigError) and not debug:  # always one line: the parser's usage dump helps no one
            _fail(command, f"{err}\nSee `talr {command} --help` for every key.", 2)
        if not friendly:
            raise
        from talr.cli_errors import user_error_message

        said = user_error_message(err)
        if said is None:
            raise
        _fail(command, *said)


def _run_trainer(argv: list[str] | None) -> None:
    logging.getLogger("talr.cli").info("starting: importing Lightning and reading the config (10-20 s on a CPU)")
    from talr.data.datamodule import DomainDataModule
    from talr.methods.sft import SFT
    from talr.trainer_cli import TalrCLI

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics", "huggingface_hub"):
        logging.getLogger(name).handlers.clear()  # their own handlers, besides ours, printed each line twice
        logging.getLogger(name).propagate = True

    TalrCLI(
        SFT,
        DomainDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
        parser_kwargs={"env_prefix": "TALR", "default_env": False, "allow_abbrev": False},
    )


def __getattr__(name: str):
    if name == "TalrCLI":  # imported lazily: `talr --help`, `report`, `average` start without Lightning
        from talr.trainer_cli import TalrCLI

        return TalrCLI
    raise AttributeError(name)


if __name__ == "__main__":
    main()
