"""The `talr fit` overrides that move a config to N nodes x G GPUs (used by train.sbatch and torchrun_multinode.sh).

    python scripts/slurm/scale_args.py --nodes 2 --gpus-per-node 8 -- --config configs/paper/...yaml [overrides]

prints one argument per line, to append to the same `talr fit` command line:

  --trainer.num_nodes N --trainer.devices G        what Lightning's SLURM / torchelastic environment checks
  --trainer.strategy.init_args.data_parallel_size N*G (and tensor_parallel_size 1) under ModelParallelStrategy (FSDP2),
                                                    whose mesh must cover every rank
  --trainer.accumulate_grad_batches K              so the global batch stays the one the config file defines
                                                    (batch_size x devices x num_nodes x accumulation as written in it;
                                                    command-line overrides change the per-rank batch, not the
                                                    experiment); an error when no integer K gives it (set
                                                    --accumulate, or change --data.batch_size)
  --trainer.callbacks+=talr.callbacks.CheckpointOnSigterm   unless the config has it (checkpoint on SIGTERM)
  --ckpt_path last                                 resume from the newest last*.ckpt of the ModelCheckpoint, if any

It reads the effective config through the CLI itself (`--print_config`), so overrides and defaults count. It
launches nothing: srun (SLURMEnvironment) or torchrun (TorchElasticEnvironment) start the processes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys

import yaml

MODEL_PARALLEL = "lightning.pytorch.strategies.ModelParallelStrategy"
CHECKPOINT_ON_SIGTERM = "talr.callbacks.CheckpointOnSigterm"


def effective_config(fit_args: list[str]) -> dict:
    """The config `talr fit <fit_args>` would run, as a dict (the CLI's own `--print_config`)."""
    from talr.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(["fit", *fit_args, "--print_config"])
        except SystemExit as e:
            if e.code not in (0, None):
                raise
    return yaml.safe_load(out.getvalue())


def _class_paths(callbacks) -> list[str]:
    items = callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []
    return [c.get("class_path", "") if isinstance(c, dict) else str(c) for c in items]


def global_batch(cfg: dict) -> int:
    trainer = cfg["trainer"]
    ranks = int(trainer.get("num_nodes") or 1) * _devices(trainer.get("devices"))
    return int((cfg.get("data") or {}).get("batch_size") or 1) * ranks * int(trainer.get("accumulate_grad_batches") or 1)


def scale_args(cfg: dict, nodes: int, gpus_per_node: int, accumulate: int | None = None,
               file_cfg: dict | None = None) -> tuple[list[str], list[str]]:
    """(arguments, notes) that run `cfg` (the effective config) on `nodes` x `gpus_per_node` ranks with the global
    batch of `file_cfg` (the config file without command-line overrides; default `cfg`)."""
    trainer, data = cfg["trainer"], cfg.get("data") or {}
    ranks = nodes * gpus_per_node
    args = ["--trainer.num_nodes", str(nodes), "--trainer.devices", str(gpus_per_node)]
    notes = []
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict) and strategy.get("class_path") == MODEL_PARALLEL:
        args += ["--trainer.strategy.init_args.data_parallel_size", str(ranks),
                 "--trainer.strategy.init_args.tensor_parallel_size", "1"]
    batch = int(data.get("batch_size") or 1)
    target = global_batch(file_cfg or cfg)
    if accumulate is None:
        if target % (batch * ranks):
            raise SystemExit(
                f"the config's global batch is {target} sequences; {batch} per rank x {ranks} ranks does not divide "
                "it. Set --accumulate (ACCUMULATE= in the scripts) or change --data.batch_size")
        accumulate = target // (batch * ranks)
    args += ["--trainer.accumulate_grad_batches", str(accumulate)]
    notes.append(f"{ranks} ranks x {batch} sequences x {accumulate} accumulation = {ranks * batch * accumulate} "
                 f"sequences per optimizer step (config: {target})")
    callbacks = _class_paths(trainer.get("callbacks"))
    if CHECKPOINT_ON_SIGTERM not in callbacks:
        args.append(f"--trainer.callbacks+={CHECKPOINT_ON_SIGTERM}")
    checkpoints = [c for c in (trainer.get("callbacks") or []) if isinstance(c, dict)
                   and c.get("class_path", "").endswith("ModelCheckpoint")]
    if not any((c.get("init_args") or {}).get("save_last") for c in checkpoints):
        notes.append("warning: no ModelCheckpoint with save_last: true; only the SIGTERM checkpoint can be resumed")
    if any((c.get("init_args") or {}).get("dirpath") in (None, "") for c in checkpoints):
        notes.append("warning: ModelCheckpoint dirpath is null: its folder follows the logger's run id, which is new "
                     "after a requeue, so --ckpt_path last finds nothing; set an explicit dirpath on shared storage")
    args += ["--ckpt_path", "last"]
    return args, notes


def _devices(devices) -> int:
    if isinstance(devices, int):
        return devices
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    return 1  # "auto" on a one-process config


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: scale_args.py --nodes N --gpus-per-node G [--accumulate K] -- <talr fit arguments>")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--accumulate", type=int, help="accumulate_grad_batches (default: keep the config's global batch)")
    opts = p.parse_args(argv[:split])
    fit_args = argv[split + 1:]
    config_only = [a for i, a in enumerate(fit_args) if a == "--config" or (i and fit_args[i - 1] == "--config")
                   or a.startswith("--config=")]
    args, notes = scale_args(effective_config(fit_args), opts.nodes, opts.gpus_per_node, opts.accumulate,
                             file_cfg=effective_config(config_only))
    for note in notes:
        print(f"[scale_args] {note}", file=sys.stderr)
    print("\n".join(args))


if __name__ == "__main__":
    main()
