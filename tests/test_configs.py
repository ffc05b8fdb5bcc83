"""Every shipped YAML parses through the CLI (`--print_config`) without loading a model.

Configs with trainer, model and data sections are complete; overlays (configs/methods/*, general_eval)
are parsed on top of the quickstart, as the README shows. Generated paper configs are checked in test_paper_configs.py.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from talr.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "paper" not in p.relative_to(ROOT / "configs").parts)


def print_config(*paths: Path) -> dict:
    out = io.StringIO()
    args = ["fit"] + [a for p in paths for a in ("--config", str(p))] + ["--print_config"]
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_parses(path):
    raw = yaml.safe_load(path.read_text())
    complete = {"trainer", "model", "data"} <= raw.keys()
    # an overlay is parsed on top of its folder's base (configs/miniature/base.yaml) or the quickstart
    base = path.parent / "base.yaml" if (path.parent / "base.yaml").exists() else ROOT / "configs" / "quickstart.yaml"
    paths = (path,) if complete else (base, path)
    parsed = print_config(*paths)
    if "model" in raw:
        if "class_path" in raw["model"]:
            assert parsed["model"]["class_path"] == raw["model"]["class_path"]
        for key, value in raw["model"].get("init_args", {}).items():
            assert parsed["model"]["init_args"][key] == value
    for callback in raw.get("trainer", {}).get("callbacks", []):
        assert callback["class_path"] in [c["class_path"] for c in parsed["trainer"]["callbacks"]]


def test_model_name_is_linked_to_the_tokenizer(tmp_path):
    from talr.cli import TalrCLI
    from talr.data.datamodule import DomainDataModule
    from talr.methods import SFT

    cli = TalrCLI(SFT, DomainDataModule, subclass_mode_model=True, run=False,
                  args=["--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.init_args.pretrained", "some/model",
                        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.callbacks=[]"])
    assert cli.datamodule.tokenizer_name == "some/model" and cli.model.hparams.pretrained == "some/model"
    assert cli.model.model is None  # nothing loaded at parse/instantiation time


def test_unknown_key_fails_before_loading_a_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.init_args.learning_rate", "1e-6"])
    assert exit_info.value.code != 0
    assert "learning_rate" in capsys.readouterr().err


def test_unknown_method_class_fails_clearly(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--model", "talr.methods.NoSuchMethod"])
    assert "NoSuchMethod" in capsys.readouterr().err
