"""Where talr's per-step time goes beyond the plain loop, on bench_train.py's model (CPU defaults).

    python bench/profile_overhead.py profile [--variant sft]      # cProfile of one run: talr's hooks vs the rest
    python bench/profile_overhead.py ablate --repeats 2 [--cpu-time]  # tokens/s with parts of the step switched off

`ablate` runs each arm in its own process, interleaved, with bench_train.py's worker (same model, batches, timing)
and monkeypatches `talr.methods.SFT` before the run:

  plain        the plain PyTorch loop (reference)
  sft          talr's SFT as it is
  no_log       SFT with `self.log`/`self.log_dict` as no-ops (7 calls per step)
  no_rescale   SFT without the gradient rescale and the finiteness check (the window counters still reset)
  no_check     SFT with the rescale alone (no finiteness check)
  bare         all of the above off
  separate_check  the earlier way: _foreach_mul_ then a _foreach_norm finiteness pass, instead of talr's one fused
               pass (torch._amp_foreach_non_finite_check_and_unscale_, GradScaler's kernel)
  sparse_logs  proposal: the 3 per-batch throughput/lr logs of on_train_batch_end only on logging steps

Timing arms that switch the normalisation off are for measurement only: they train a different objective.
Extra arguments after `--` go to bench_train.py (e.g. `-- --attn eager --threads 1`).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
ARMS = ["plain", "sft", "no_log", "no_rescale", "no_check", "bare", "separate_check", "sparse_logs"]


def patch(arm: str) -> None:
    import talr.methods.exact_step as exact_step
    from talr.methods.sft import SFT

    if arm in ("no_log", "bare"):
        SFT.log = lambda self, *a, **k: None
        SFT.log_dict = lambda self, *a, **k: None
    if arm in ("no_rescale", "bare"):
        SFT.finish_gradient = lambda self: self.step_window.close(self.trainer)  # the window counters still reset
    if arm == "no_check":  # the rescale alone
        def rescale_only(grads, scale, trainer):
            import torch

            torch._foreach_mul_([g.to_local() if hasattr(g, "to_local") else g for g in grads], scale)
            return True
        exact_step.rescale_and_check = rescale_only
    if arm == "separate_check":  # before the fused pass: _foreach_mul_ then a _foreach_norm finiteness pass
        def separate(grads, scale, trainer):
            import torch

            local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            torch._foreach_mul_(local, scale)
            return bool(torch.isfinite(torch.stack(torch._foreach_norm(local)).float().sum()))
        exact_step.rescale_and_check = separate
    if arm == "sparse_logs":
        batch_end = SFT.on_train_batch_end

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
                batch_end(self, outputs, batch, batch_idx)

        SFT.on_train_batch_end = on_train_batch_end


def worker(arm: str, bench_args: list[str], profile: bool) -> dict:
    import bench_train

    patch(arm)
    if os.environ.get("CPU_TIME"):  # time steps in this process's CPU seconds: robust to a shared, oversubscribed host
        import time

        bench_train._clock = time.process_time
    variant = "plain" if arm == "plain" else "sft"
    args = bench_train.parse_args(bench_args + ["--worker", variant])
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    attn = args.attns[0]
    import time

    prof = (cProfile.Profile(time.process_time) if os.environ.get("CPU_TIME") else cProfile.Profile()) if profile else None
    if prof:
        prof.enable()
    times = bench_train.run_plain(args, attn) if arm == "plain" else bench_train.run_lightning(args, "sft")
    if prof:
        prof.disable()
    timed = times[args.warmup:]
    out = {"arm": arm, "step_s_median": statistics.median(timed), "step_s": timed,
           "tokens_per_s_median": args.batch * args.seq / statistics.median(timed)}
    if prof:
        s = io.StringIO()
        stats = pstats.Stats(prof, stream=s).sort_stats("cumulative")
        stats.print_stats(r"sft\.py|talr/losses|adam\.py|_foreach|core/module\.py.*\b(log|log_dict)\b|logger_connector|"
                          r"result\.py.*(log|update)|training_epoch_loop|automatic\.py|run_backward|bench_train|"
                          r"lr_scheduler|zero_grad|fetchers|collat|loss_utils|modeling_llama.*forward", 60)
        out["profile"] = s.getvalue()
        out["total_s"] = sum(times)
    return out


def main() -> None:
    argv = sys.argv[1:]
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["profile", "ablate", "_worker"])
    p.add_argument("--variant", default="sft", help="profile: plain or an ablation arm")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--cpu-time", action="store_true", help="time steps in process CPU seconds, not wall seconds "
                   "(with --threads 1: what the step costs, whatever else runs on the machine)")
    a = p.parse_args(argv)
    defaults = ["--attn", "eager", "--threads", "1"]
    bench_args = defaults + bench_args
    if a.mode == "_worker":
        print("RESULT " + json.dumps(worker(a.variant, bench_args, profile=bool(os.environ.get("PROFILE")))))
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(HERE.parent)}
    arms = [a.variant] if a.mode == "profile" else a.arms.split(",")
    if a.mode == "profile":
        env["PROFILE"] = "1"
    if a.cpu_time:
        env["CPU_TIME"] = "1"
    results: dict[str, list[dict]] = {}
    for r in range(1 if a.mode == "profile" else a.repeats):
        for arm in arms:
            proc = subprocess.run([sys.executable, __file__, "_worker", "--variant", arm, "--", *bench_args],
                                  capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(proc.stderr[-4000:])
            res = json.loads(line[-1][7:])
            results.setdefault(arm, []).append(res)
            print(f"[{r + 1}] {arm}: {res['tokens_per_s_median']:.0f} tokens/s ({res['step_s_median'] * 1e3:.0f} ms/step)",
                  file=sys.stderr, flush=True)
    if a.mode == "profile":
        print(results[a.variant][0]["profile"])
        return
    base = statistics.median(x["step_s_median"] for x in results["plain"]) if "plain" in results else None
    print("| arm | ms/step (median of runs) | tokens/s | vs plain | ms/step above plain |")
    print("|---|---|---|---|---|")
    for arm, runs in results.items():
        ms = statistics.median(x["step_s_median"] for x in runs)
        tps = statistics.median(x["tokens_per_s_median"] for x in runs)
        rel = f"{base / ms:.3f}" if base else "-"
        extra = f"{(ms - base) * 1e3:+.0f}" if base else "-"
        print(f"| {arm} | {ms * 1e3:.0f} | {tps:.0f} | {rel} | {extra} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
