"""The paper-reproduction configs (configs/paper) and the wandb sweeps (sweeps/).

Parsing: one jsonargparse parser is built once (the CLI's own, via TalrCLI) and parses both bases and a
deterministic sample of 24 generated configs (every domain x format x method once; models and LRs rotate),
about 0.2 s each; parsing all 288 would take about a minute on the 2-core build machines. The other configs
are checked structurally: every class path imports, every key exists in the signature it configures.
`scripts/make_paper_configs.py --check` proves every file is exactly what the generator writes from the
bases, so a sample that parses plus the structural check covers the set.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("make_paper_configs", ROOT / "scripts" / "make_paper_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()
GRID = [(d, f, m, meth, lr) for d in gen.DOMAINS for f in gen.FORMATS for m in gen.MODELS for meth in gen.METHODS
        for lr in gen.LRS]


def sample() -> list[tuple]:
    """Every (domain, format, method) once; model and LR rotate so each appears several times."""
    models, lrs, out = list(gen.MODELS), list(gen.LRS), []
    for k, (d, f, meth) in enumerate((d, f, meth) for d in gen.DOMAINS for f in gen.FORMATS for meth in gen.METHODS):
        out.append((d, f, models[k % len(models)], meth, lrs[k % len(lrs)]))
    return out


@pytest.fixture(scope="module")
def parser():
    from talr.cli import TalrCLI
    from talr.data.datamodule import DomainDataModule
    from talr.methods.sft import SFT

    class Built(Exception):
        pass

    class ParserOnly(TalrCLI):
        def parse_arguments(self, parser, args):
            raise Built(parser)

    try:
        ParserOnly(SFT, DomainDataModule, subclass_mode_model=True, args=["fit"],
                   parser_kwargs={"env_prefix": "TALR", "default_env": False})
    except Built as built:
        return built.args[0]


def body(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# -- generator -----------------------------------------------------------------------------------------
def test_generator_check_passes_and_detects_drift():
    assert gen.main(["--check"]) == 0
    files = gen.expected()
    some = next(iter(files))
    assert gen.check({**files, some: files[some] + "# edited\n"}) == [f"differs: {some.relative_to(ROOT).as_posix()}"]
    assert gen.expected() == files  # deterministic


def test_grid_is_complete():
    assert len(GRID) == 2 * 2 * 4 * 6 * 3 == 288
    files = gen.expected()
    assert set(files) == {gen.config_path(*cell) for cell in GRID}
    assert gen.generated_files_on_disk() == set(files)


@pytest.mark.parametrize("cell", GRID[::7], ids=lambda c: "/".join(c))
def test_header_names_figure_and_command(cell):
    domain, fmt, model, method, lr = cell
    path = gen.config_path(*cell)
    text = path.read_text()
    rel = path.relative_to(ROOT).as_posix()
    assert text.startswith("# Paper reproduction (arXiv 2509.20758)")
    assert f"python -m talr fit --config {rel}" in text
    assert "Feeds: " in text
    if method == "wiseft":
        assert f"python -m talr average --init {gen.MODELS[model][0]}" in text and "--alphas 0.5" in text
    if method == "sft":
        assert "Figure 1" in text


def test_values_follow_the_grid():
    for cell in GRID:
        domain, fmt, model, method, lr = cell
        cfg = body(gen.config_path(*cell))
        init = cfg["model"]["init_args"]
        assert init["pretrained"] == gen.MODELS[model][0] and init["lr"] == gen.LRS[lr]
        assert cfg["data"]["task"]["init_args"]["format"] == fmt
        assert cfg["trainer"]["max_epochs"] == 20 and cfg["trainer"]["devices"] == 8
        assert cfg["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
        assert cfg["trainer"]["strategy"]["init_args"]["data_parallel_size"] == 8
        assert init["decoder_layer_classes"] == [path.rsplit(".", 1)[-1] for path in gen.MODELS[model][1]]
        assert cfg["model"]["class_path"] == body(gen.METHOD_CONFIGS / gen.METHODS[method][0])["model"]["class_path"]
        callbacks = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
        assert {"talr.callbacks.RunSummary", "talr.callbacks.ExportHF", "talr.general.GeneralEvalCallback"} <= set(callbacks)
    sft = body(gen.config_path("medcalc", "cot", "Qwen3-4B", "sft", "1e-6"))
    assert body(gen.config_path("medcalc", "cot", "Qwen3-4B", "wiseft", "1e-6")) == sft  # WiSE-FT = the SFT run


# -- parsing -------------------------------------------------------------------------------------------
def test_sample_and_bases_parse(parser):
    paths = [ROOT / "configs/paper/base_medcalc.yaml", ROOT / "configs/paper/base_esci.yaml"]
    paths += [gen.config_path(*cell) for cell in sample()]
    assert len(paths) == 26
    for path in paths:
        cfg = parser.parse_args(["fit", "--config", str(path)]).fit
        raw = body(path)
        assert cfg.model.class_path == raw["model"]["class_path"]
        assert cfg.model.init_args.lr == raw["model"]["init_args"]["lr"]
        assert cfg.data.tokenizer == raw["model"]["init_args"]["pretrained"]  # linked by the CLI
        assert cfg.data.task.init_args.format == raw["data"]["task"]["init_args"]["format"]
        assert cfg.trainer.strategy.init_args.timeout.total_seconds() == 3 * 3600  # parsed to a timedelta
        assert cfg.model.init_args.decoder_layer_classes == raw["model"]["init_args"]["decoder_layer_classes"]


def test_print_config_through_the_cli():
    from talr.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(gen.config_path("esci", "cot", "gemma-3-4b-it", "talr", "5e-6")), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["class_path"] == "talr.methods.TALR" and printed["model"]["init_args"]["tau"] is None


def _import(class_path: str):
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _accepted(cls) -> set[str] | None:
    """Keyword names an __init__ accepts, following **kwargs up the MRO; None when **kwargs leave the class
    hierarchy (e.g. WandbLogger passes them to wandb.init; the parsed sample covers those)."""
    names: set[str] = set()
    for klass in cls.__mro__[:-1]:  # not object
        if "__init__" not in klass.__dict__:
            continue
        params = inspect.signature(klass.__dict__["__init__"]).parameters
        names |= {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return names
    return None


def _check_class(node: dict, where: str) -> None:
    accepted = _accepted(_import(node["class_path"]))
    unknown = set() if accepted is None else set(node.get("init_args") or {}) - accepted
    assert not unknown, f"{where}: {node['class_path']} has no argument(s) {sorted(unknown)}"


def test_all_configs_structurally_valid():
    from lightning.pytorch import Trainer

    from talr.data.datamodule import DomainDataModule

    with pytest.raises(AssertionError, match="bogus"):
        _check_class({"class_path": "talr.methods.TALR", "init_args": {"tau": 1.0, "bogus": 1}}, "self-test")
    trainer_keys, data_keys = _accepted(Trainer), _accepted(DomainDataModule)
    for path in [gen.config_path(*cell) for cell in GRID]:
        cfg, where = body(path), path.name
        assert set(cfg) == {"seed_everything", "trainer", "model", "data"}, where
        assert not set(cfg["trainer"]) - trainer_keys, where
        assert not set(cfg["data"]) - data_keys, where
        for node in (cfg["trainer"]["strategy"], cfg["trainer"]["logger"], cfg["model"], cfg["data"]["task"],
                     *cfg["trainer"]["callbacks"]):
            _check_class(node, f"{path.parent.name}/{where}")
        model = path.parent.name
        for layer, name in zip(gen.MODELS[model][1], cfg["model"]["init_args"]["decoder_layer_classes"], strict=True):
            assert isinstance(_import(layer), type) and layer.rsplit(".", 1)[-1] == name  # a real transformers class


# -- sweeps --------------------------------------------------------------------------------------------
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def _sweep_command(sweep: dict) -> list[str]:
    """The fixed part of the run command, as the agent would run it (with a made-up run id)."""
    command = sweep["command"]
    assert command[:3] == ["${env}", "bash", "-c"] and command[-1] == "${args}", command
    tokens = shlex.split(command[3].replace("$WANDB_RUN_ID", "run0"))
    assert tokens[:6] == ["exec", "python", "-m", "talr", "fit", "--config"] and tokens[-1] == "$@", tokens
    assert (ROOT / tokens[6]).exists(), tokens[6]
    return tokens[4:-1]


def _expected(name: str, value):
    return None if value == "null" else value


def _get(cfg, name: str):
    return cfg["model"].class_path if name == "model" else cfg[name]


def test_sweeps_exist():
    assert {p.stem for p in SWEEPS} >= {"lr_grid", "method_grid", "talr_tau_ablation"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_parameters_are_config_keys(path, parser):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load(path.read_text())
    fixed = _sweep_command(sweep)
    params = {k: v.get("values", [v.get("value")]) for k, v in sweep["parameters"].items()}
    combos = [{k: vals[0] for k, vals in params.items()}]
    combos += [{**combos[0], k: v} for k, vals in params.items() for v in vals[1:]]
    for combo in combos:
        flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in combo.items()}})["args"]
        cfg = parser.parse_args(fixed + flags).fit
        for name, value in combo.items():
            assert _get(cfg, name) == _expected(name, value), (path.name, name, value)
        assert cfg.trainer.logger.init_args.save_dir.endswith("/run0")
