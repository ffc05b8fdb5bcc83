"""Finding runs and reading what they are: identity, experiment setup, metrics, and the files of one run.

A *run* is one directory with a `summary.json` (`talr fit`, `validate` or `test`). Files that belong to it are
merged into one record, newer values winning: `general.json` (`talr evaluate`) and `drift.json` beside the
summary, a later `talr test|validate` whose summary lies in a subdirectory (`<run>/test/summary.json`) or
whose `config.yaml` names a checkpoint inside the run (`ckpt_path`), and evaluate JSONs given explicitly
whose `settings.model` is the run's `hf/` directory.

A run's *identity* (KEY) is what the paper's tables are indexed by; its *setup* is every other setting that
makes it a different experiment (data source and a fingerprint of the data, max_examples and the other
task settings, steps and epochs, max_length, method hyperparameters, the evaluation's limits, seeds).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import math
import re
from pathlib import Path

log = logging.getLogger("talr.report")

CLASS_METHOD = {"SFT": "sft", "L2Init": "l2", "LoRA": "lora", "FLOW": "flow", "TALR": "talr", "DFT": "dft",
                "TruncatedSFT": "truncated"}
TASK_DOMAIN = {"MedCalc": "medcalc", "ESCI": "esci"}
RUN_DIR = re.compile(r"^(?P<method>[a-z0-9_]+?)_lr(?P<lr>\d[\d.]*e-?\d+)$")
ALPHA_DIR = re.compile(r"^alpha_(?P<alpha>\d[\d.]*)$")
WANDB_NAME = re.compile(r"^(?P<domain>[a-z]+)-(?P<format>cot|label)-(?P<model>.+)-(?P<method>[a-z0-9_]+)"
                        r"-lr(?P<lr>[\d.e+-]+)$")
KEY = ("domain", "format", "model", "method", "lr", "alpha")
# Setup fields in which repeats of one experiment may differ. Everything else in the setup must be equal.
SEED_FIELDS = ("seed", "data.seed", "model.init_seed")
# Settings that do not change what is learnt or measured (implementation, memory, logging): not in the setup.
NOT_SETUP = {"pretrained", "lr", "trust_remote_code", "attn_implementation", "gradient_checkpointing", "compile",
             "generate_in_eval", "baseline_eval", "nonfinite", "loss_chunk_size", "decoder_layer_classes",
             "fsdp_layer_classes",  # the old name of decoder_layer_classes, in runs written before the rename
             "fsdp_reshard_after_forward", "_class_path", "_instantiator"}
TRAINER_SETUP = ("max_steps", "max_epochs", "accumulate_grad_batches", "precision", "gradient_clip_val",
                 "limit_train_batches", "overfit_batches")
DATA_SETUP = ("max_length", "overlong", "batch_size", "group_by_length", "chat_template_kwargs")
EVAL_CALLBACKS = {"GeneralEvalCallback": ("general", ("tasks", "limit", "max_gen_toks", "apply_chat_template")),
                  "CodeLengthDriftCallback": ("drift", ("num_prompts", "max_new_tokens", "prompts_file"))}
# The data fingerprint: rows read per split (before tokenisation) and, where a summary records one, a content hash.
DATA_COUNTS = re.compile(r"^rows/")


def method_of(class_name: str | None, hparams: dict) -> str | None:
    method = CLASS_METHOD.get((class_name or "").rsplit(".", 1)[-1])
    if method == "talr" and hparams.get("tau") is not None:
        method = f"talr_tau{float(hparams['tau']):g}"
    return method


def model_name(pretrained) -> str:
    """'Qwen/Qwen2.5-3B-Instruct' -> 'Qwen2.5-3B-Instruct'; 'builtin:SmolLM2-135M-Instruct' -> 'SmolLM2-135M-Instruct'."""
    return str(pretrained).rstrip("/").rsplit("/", 1)[-1].removeprefix("builtin:")


def _float(value) -> float | None:
    try:
        return None if math.isnan(out := float(value)) else out
    except (TypeError, ValueError):
        return None


def _plain(value):
    """A hashable, comparable form of a config value (lists -> tuples, dicts -> sorted JSON)."""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return value  # 1.0 and 1 stay distinct types but compare equal
    return value


# -- finding files -----------------------------------------------------------------------------------
def find_files(inputs: list[str], name: str) -> list[Path]:
    found: set[Path] = set()
    for item in inputs:
        for path in [Path(p) for p in sorted(glob.glob(item, recursive=True))] or [Path(item)]:
            if path.is_dir():
                found.update(path.rglob(name))
            elif path.is_file() and path.name == name:
                found.add(path)
    return sorted(found)


def find_summaries(inputs: list[str]) -> list[Path]:
    return find_files(inputs, "summary.json")


# -- one run -----------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict:
    """The config.yaml LightningCLI saved beside a summary (the subcommand level removed), or {}."""
    if not path.exists():
        return {}
    import yaml

    cfg = yaml.safe_load(path.read_text()) or {}
    for sub in ("fit", "validate", "test", "predict"):
        if isinstance(cfg.get(sub), dict):
            return cfg[sub]
    return cfg


def _identity_from_config(cfg: dict) -> dict:
    out: dict = {}
    model = cfg.get("model") or {}
    init = model.get("init_args") or {}
    if method := method_of(model.get("class_path"), init):
        out["method"] = method
    if init.get("lr") is not None:
        out["lr"] = float(init["lr"])
    if init.get("pretrained"):
        out["model"] = model_name(init["pretrained"])
    task = (cfg.get("data") or {}).get("task") or {}
    if domain := TASK_DOMAIN.get(str(task.get("class_path", "")).rsplit(".", 1)[-1]):
        out["domain"] = domain
    if (task.get("init_args") or {}).get("format"):
        out["format"] = task["init_args"]["format"]
    return out


def _identity_from_path(path: Path) -> dict:
    """Run identity from the paper layout <domain>/<format>/<model>/<method>_lr<lr>[/alpha_<a>]."""
    parts = path.parts
    for i in range(len(parts) - 1, 2, -1):
        match = RUN_DIR.match(parts[i])
        if match and parts[i - 2] in ("cot", "label"):
            out = {"domain": parts[i - 3], "format": parts[i - 2], "model": parts[i - 1],
                   "method": match["method"], "lr": float(match["lr"])}
            alphas = [float(a["alpha"]) for a in map(ALPHA_DIR.match, parts[i + 1:]) if a]
            return {**out, "alpha": alphas[0]} if alphas else out
    return {}


def setup_of(summary: dict, cfg: dict) -> dict:
    """Every setting besides the identity that makes a run a different experiment, as flat `section.key`."""
    trained = "wall_time_s/fit" in summary or not summary  # validate/test-only runs have no training budget
    hparams = dict(summary.get("hparams") or {})
    model_args = dict((cfg.get("model") or {}).get("init_args") or {}) or hparams
    out: dict = {f"model.{k}": _plain(v) for k, v in model_args.items() if k not in NOT_SETUP}
    if not trained:  # only what changes the evaluation
        out = {k: v for k, v in out.items() if k in ("model.max_new_tokens", "model.dtype")}
    task = summary.get("task") or {}
    task_cfg = (cfg.get("data") or {}).get("task") or {}
    task_args = dict(task_cfg.get("init_args") or {})
    task_args.setdefault("source", task.get("source"))
    out.update({f"task.{k}": _plain(v) for k, v in task_args.items() if k != "format"})
    counts = {k: v for k, v in (summary.get("data") or {}).items() if DATA_COUNTS.match(k)}
    content = task.get("fingerprint")  # a content hash, where the run recorded one
    if counts or content:
        text = json.dumps({"counts": counts, "content": content}, sort_keys=True)
        out["data.fingerprint"] = hashlib.sha1(text.encode()).hexdigest()[:8]
    data = cfg.get("data") or {}
    out.update({f"data.{k}": _plain(data[k]) for k in DATA_SETUP if k in data and (trained or k == "max_length")})
    trainer = cfg.get("trainer") or {}
    if trained:
        out["steps"] = summary.get("optimizer_steps")
        out.update({f"trainer.{k}": _plain(trainer[k]) for k in TRAINER_SETUP if k in trainer})
        if "devices" in trainer:
            out["trainer.devices"] = _plain(trainer.get("devices"))
            out["trainer.num_nodes"] = trainer.get("num_nodes", 1)
        if cfg:
            out["seed"] = cfg.get("seed_everything")
            out["data.seed"] = data.get("seed", 0)
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, dict):
            name = str(callback.get("class_path", "")).rsplit(".", 1)[-1]
            if name in EVAL_CALLBACKS:
                prefix, keys = EVAL_CALLBACKS[name]
                args = callback.get("init_args") or {}
                out.update({f"{prefix}.{k}": _plain(args[k]) for k in keys if k in args})
    return out


def general_json_metrics(path: Path) -> dict[str, float]:
    """`talr evaluate` results as the callback's flat keys."""
    result = json.loads(path.read_text())
    flat = {f"general/{task}/{metric}": float(v) for task, metrics in result.get("results", {}).items()
            for metric, v in metrics.items() if not metric.endswith("_stderr") and isinstance(v, (int, float))}
    if result.get("general/score") is not None:
        flat["general/score"] = float(result["general/score"])
    return flat


def _blank(**extra) -> dict:
    return {"domain": None, "format": None, "model": None, "method": None, "lr": None, "alpha": None,
            "setup": {}, "metrics": {}, "baseline": {}, "sources": [], "merged": [], "run_dir": None,
            "mtime": 0.0, "ckpt_path": None, **extra}


def load_summary(path: Path) -> dict:
    """One summary.json (plus the config.yaml, general.json and drift.json beside it) as a run record."""
    summary = json.loads(path.read_text())
    hparams = summary.get("hparams") or {}
    cfg = _read_config(path.parent / "config.yaml")
    run = _blank(method=method_of(summary.get("method"), hparams),
                 lr=float(hparams["lr"]) if hparams.get("lr") is not None else None,
                 run_dir=path.parent.resolve(), mtime=path.stat().st_mtime, sources=[str(path)],
                 ckpt_path=cfg.get("ckpt_path"), stage="fit" if "wall_time_s/fit" in summary else "eval")
    if hparams.get("pretrained"):
        run["model"] = model_name(hparams["pretrained"])
    task = summary.get("task") or {}
    run.update({k: task[k] for k in ("domain", "format") if task.get(k)})
    run.update(_identity_from_config(cfg))
    from_path = _identity_from_path(path.parent.resolve())
    run.update(from_path)
    if run["stage"] == "eval" and not run["ckpt_path"] and "method" not in from_path:
        run.update(method="base", lr=None)  # `talr validate|test` of the pretrained model itself: nothing trained
    run["setup"] = setup_of(summary, cfg)
    metrics = dict(summary.get("final") or {})
    if (general := path.parent / "general.json").exists():
        metrics.update(general_json_metrics(general))
        run["sources"].append(str(general))
    if (drift := path.parent / "drift.json").exists():  # measured after the fact (e.g. WiSE-FT)
        metrics.update({k: float(v) for k, v in json.loads(drift.read_text()).items() if k.startswith("drift/")})
        run["sources"].append(str(drift))
    run.update(metrics=metrics,
               baseline={**(summary.get("baseline") or {}), **(summary.get("general_baseline") or {})})
    return run


def load_general_json(path: Path) -> dict:
    """A `talr evaluate` JSON as a run record of its own (a base or averaged model evaluated on its own)."""
    result = json.loads(path.read_text())
    model = str((result.get("settings") or {}).get("model") or path.parent.name)
    name = model_name(model)
    run = _blank(model=None if name == "hf" else name, method="base",  # a run's hf/: the run names the model
                 metrics=general_json_metrics(path), sources=[str(path)], run_dir=path.parent.resolve(),
                 mtime=path.stat().st_mtime, stage="eval", evaluated_model=model)
    settings = result.get("settings") or {}
    run["setup"] = {f"general.{k}": _plain(settings.get(k)) for k in ("tasks", "limit", "max_gen_toks")
                    if settings.get(k) is not None}
    run.update(_identity_from_path(path.parent.resolve()))
    return run


def load_wandb_csv(path: str | Path) -> list[dict]:
    """Runs from a wandb runs-table export: identity from the run name the paper configs give
    (`<domain>-<format>-<model>-<method>-lr<lr>`) or the `lr`/`pretrained` columns; metrics from columns
    named like the logged keys (`val/acc`, `general/score`, ...)."""
    runs = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            match = WANDB_NAME.match(row.get("Name") or row.get("name") or "")
            run = _blank(sources=[f"{path}:{i + 2}"], mtime=float(i), stage="fit")
            if match:
                run.update(match.groupdict(), lr=float(match["lr"]))
            else:
                run["lr"] = _float(row.get("lr"))
                run["model"] = model_name(row.get("pretrained") or "") or None
            run["setup"] = {k: _plain(row[k]) for k in ("seed", "steps") if row.get(k) not in (None, "")}
            metrics = {k: _float(v) for k, v in row.items() if "/" in k and _float(v) is not None}
            run.update(metrics=metrics, baseline={k[len("baseline/"):]: v for k, v in metrics.items()
                                                  if k.startswith("baseline/")})
            runs.append(run)
    return runs


# -- files of one run --------------------------------------------------------------------------------
def _owner(run: dict, by_dir: dict[Path, dict]) -> dict | None:
    """The run a record belongs to: an ancestor directory's run, or the run its checkpoint/model lies in."""
    candidates = []
    if run.get("run_dir") is not None:
        candidates += list(run["run_dir"].parents)
    for ref in (run.get("ckpt_path"), run.get("evaluated_model")) if run.get("stage") != "fit" else ():
        if ref and Path(ref).expanduser().exists():
            resolved = Path(ref).expanduser().resolve()
            candidates += [resolved, *resolved.parents]
    for directory in candidates:
        owner = by_dir.get(directory)
        if owner is not None and owner is not run and _same_identity(owner, run):
            return owner
    return None


def _same_identity(a: dict, b: dict) -> bool:
    """Identity fields both records know agree (an `alpha_0.50` below a run is a different model)."""
    return all(a.get(k) is None or b.get(k) is None or a.get(k) == b.get(k) for k in KEY if k != "method") \
        and (b.get("method") in (None, "base") or a.get("method") == b.get("method"))


def merge_run_files(runs: list[dict]) -> list[dict]:
    """Fold a run's later records (test/validate below it, evaluate JSONs of its `hf/`) into it."""
    runs = sorted(runs, key=lambda r: (r["mtime"], r["sources"]))
    fits = {r["run_dir"]: r for r in runs if r.get("run_dir") is not None and r.get("stage") == "fit"}
    kept = []
    for run in runs:
        owner = _owner(run, fits)
        if owner is None:
            kept.append(run)
            continue
        owner["metrics"].update(run["metrics"])
        owner["baseline"].update(run["baseline"])
        owner["sources"] += run["sources"]
        owner["merged"].append(str(run["sources"][0]))
        log.info("report: %s belongs to the run in %s (merged)", run["sources"][0], owner["run_dir"])
    return kept


def merge_runs(runs: list[dict]) -> list[dict]:
    """Records of one run merged (see merge_run_files); distinct runs stay distinct (repeats are grouped later)."""
    return merge_run_files([{**r, "metrics": dict(r["metrics"]), "baseline": dict(r["baseline"]),
                             "sources": list(r["sources"]), "merged": list(r.get("merged", []))} for r in runs])


def collect(inputs: list[str], wandb_csvs: list[str] = (), general_jsons: list[str] = ()) -> list[dict]:
    """Every run under `inputs` (summary.json files; `general.json` files with no summary beside them count as
    runs of their own, or join the run whose `hf/` they evaluated), wandb exports and explicit evaluate JSONs."""
    runs = [load_summary(p) for p in find_summaries(inputs)]
    beside = {Path(s).resolve() for r in runs for s in r["sources"]}
    general = [p for p in find_files(inputs, "general.json") if p.resolve() not in beside]
    general += [Path(p) for p in general_jsons if Path(p).resolve() not in beside]
    runs += [load_general_json(p) for p in dict.fromkeys(general)]
    for path in wandb_csvs:
        runs += load_wandb_csv(path)
    return merge_runs(runs)
