"""Training throughput and peak memory of talr's methods against a plain PyTorch loop, in one run.

Variants, each in a fresh process (so peak memory is its own), on the same random-token batches:
  plain        HF model + torch.optim.AdamW + the model's own `labels=` loss (one run per --attn value)
  plain_compiled the same with torch.compile(model) (the GPU yardstick)
  sft, talr, flow, l2
               talr.methods.SFT / TALR / FLOW / L2Init through a real lightning.pytorch.Trainer
  sft_chunked  SFT with the chunked per-token loss (talr.ops.causal_lm_token_losses)
  sft_compiled SFT with `compile: true` (torch.compile of each decoder layer, in place)
The model is a random-init HF architecture (no pretrained weights needed). Warmup steps are excluded;
a step is timed from the end of the previous step to the end of this one (data, forward, backward,
optimizer, framework hooks). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ["plain", "plain_compiled", "sft", "talr", "flow", "l2", "sft_chunked", "sft_compiled"]
# Dense bf16 peak of the GPU, for MFU (--peak-tflops overrides): NVIDIA's datasheet figure without sparsity.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--config-from", help="HF config.json (or a directory holding one); overrides the size flags")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, help="attention heads (default hidden/64)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default heads)")
    p.add_argument("--intermediate", type=int, help="MLP width (default 8/3·hidden rounded to 64)")
    p.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary: the logits dominate small models")
    p.add_argument("--untied", action="store_true", help="separate input and output embeddings")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt-frac", type=float, default=0.5, help="share of each sequence masked as prompt (-100)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=1, help="run every variant this many times, interleaved; medians")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["32-true", "bf16-mixed", "bf16-true"], default="32-true")
    p.add_argument("--attn", default="sdpa", help="attention implementation(s), comma-separated (sdpa, eager, "
                   "flash_attention_2); the plain loop runs once per value, talr variants use the first")
    p.add_argument("--compile", action="store_true", help="torch.compile the plain loop's model (= plain_compiled)")
    p.add_argument("--compile-layers", action="store_true",
                   help="every talr variant compiles its decoder layers (model.init_args.compile: true)")
    p.add_argument("--baseline", default="plain", help="variant the ratios refer to (plain: the first --attn)")
    p.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU (default: known GPUs' dense "
                   "bf16 datasheet figure; none on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--loss-chunk-size", type=int, default=256, help="supervised tokens per chunk for sft_chunked")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--omp-wait-policy", choices=["passive", "active", "inherit"], default="passive",
                   help="OMP_WAIT_POLICY of the workers: OpenMP's spinning threads slow a shared, oversubscribed "
                   "CPU by up to 100x (passive); 'inherit' keeps the environment's")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: time steps in the worker's CPU "
                   "seconds (CPU device, with --threads 1): what a step costs, whatever else runs on a shared machine")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one variant, print one JSON line
    args = p.parse_args(argv)
    args.attns = [a.strip() for a in args.attn.split(",") if a.strip()]
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variant_list) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda was requested but CUDA is not available on this machine (torch "
                    f"{torch.__version__}); run on a GPU node or use --device cpu")
    elif args.precision != "32-true":
        print(f"warning: {args.precision} on CPU is emulated on most CPUs and far slower than fp32", file=sys.stderr)
    return args


# --- model and data ---------------------------------------------------------------------------------

def model_config(args):
    from transformers import AutoConfig, LlamaConfig, Qwen2Config

    if args.config_from:
        path = args.config_from
        return AutoConfig.from_pretrained(os.path.dirname(path) if path.endswith(".json") else path)
    heads = args.heads or max(args.hidden // 64, 1)
    inter = args.intermediate or 64 * round(8 * args.hidden / 3 / 64)
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=inter,
                  num_hidden_layers=args.layers, num_attention_heads=heads,
                  num_key_value_heads=args.kv_heads or heads, max_position_embeddings=max(args.seq, 2048),
                  tie_word_embeddings=not args.untied, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return (Qwen2Config if args.arch == "qwen2" else LlamaConfig)(**common)


def build_model(args, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model_config(args)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    if args.precision == "bf16-true":
        model = model.to(torch.bfloat16)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def examples(args, vocab: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1)
    n = args.batch * (args.warmup + args.steps)
    ids = torch.randint(3, vocab, (n, args.seq), generator=g)
    prompt = int(args.prompt_frac * args.seq)
    out = []
    for i in range(n):
        row = ids[i].tolist()
        out.append({"input_ids": row, "labels": [-100] * prompt + row[prompt:], "index": i})
    return out


# --- the variants -----------------------------------------------------------------------------------

_clock = time.perf_counter  # --clock cpu: time.process_time (set in the worker)

def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_plain(args, attn: str, compiled: bool = False) -> list[float]:
    import torch
    from torch.utils.data import DataLoader

    from talr.data.encoding import Collator

    with torch.device(args.device):  # random init on the device: seconds, not a minute, for 1.5B parameters
        model = build_model(args, attn)
    data = examples(args, model.config.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=args.device == "cuda")
    step_model = torch.compile(model) if compiled or args.compile else model
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    times, last = [], None
    _sync(args.device)
    last = _clock()
    for batch in DataLoader(data, batch_size=args.batch, collate_fn=Collator(0)):
        batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = step_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(args.device)
        now = _clock()
        times.append(now - last)
        last = now
    return times


def run_lightning(args, variant: str) -> list[float]:
    import lightning.pytorch as L
    import torch
    from torch.utils.data import DataLoader

    from talr.data.encoding import Collator
    from talr.methods import FLOW, SFT, TALR, L2Init
    from talr.ops import causal_lm_token_losses

    cls, extra = {"sft": (SFT, {}), "talr": (TALR, {}), "flow": (FLOW, {"flow_cache": None}),
                  "l2": (L2Init, {}), "sft_chunked": (SFT, {}), "sft_compiled": (SFT, {})}[variant]
    attn, data = args.attns[0], None

    class Bench(cls):  # the random-init model instead of `pretrained`
        def configure_model(self):
            if self.model is None:
                self.model = build_model(args, attn)
                self.tokenizer = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 2})()
                if variant == "sft_compiled" or args.compile_layers:
                    self.compile_layers()

        def token_losses(self, batch):
            if variant != "sft_chunked":
                return super().token_losses(batch)
            return causal_lm_token_losses(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          chunk_size=args.loss_chunk_size)

    class Task:
        def metrics(self):
            return torch.nn.ModuleDict()

    class Data(L.LightningDataModule):
        task = Task()

        def __init__(self):
            super().__init__()
            self.examples = {"train": data}

        def train_dataloader(self):
            return DataLoader(self.examples["train"], batch_size=args.batch, collate_fn=Collator(0))

    class Timer(L.Callback):
        def __init__(self):
            self.times, self.last = [], None

        def on_train_start(self, trainer, pl_module):
            _sync(args.device)
            self.last = _clock()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(args.device)
            now = _clock()
            self.times.append(now - self.last)
            self.last = now

    data = examples(args, model_config(args).vocab_size)
    module = Bench(lr=args.lr, warmup_ratio=0.0, baseline_eval=False, generate_in_eval=False, **extra)
    timer = Timer()
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision,
        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
        default_root_dir=os.environ.get("TMPDIR", "/tmp"),
    )
    trainer.fit(module, Data())
    return timer.times


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global _clock
        _clock = time.process_time
    import lightning.pytorch  # noqa: F401  imported before the baseline: their memory is not the training's
    import transformers  # noqa: F401

    import talr.methods  # noqa: F401
    import talr.ops  # noqa: F401

    variant, _, attn = args.worker.partition(":")
    attn = attn or args.attns[0]
    rss0 = _reset_peak_kib()
    if variant.startswith("plain"):
        times = run_plain(args, attn, compiled=variant == "plain_compiled")
    else:
        times = run_lightning(args, variant)
    timed = times[args.warmup:]
    tokens = args.batch * args.seq
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (_status_kib("VmHWM") - rss0) / 1024
    import platform

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    return {"variant": variant, "attn": attn or args.attns[0], "steps": len(timed), "device_name": device_name,
            "step_s_median": statistics.median(timed), "tokens_per_s": tokens * len(timed) / sum(timed),
            "tokens_per_s_median": tokens / statistics.median(timed), "peak_mib": peak}


def _status_kib(key: str) -> int:
    """/proc/self/status field in KiB. VmHWM is this process's own peak RSS; ru_maxrss is not (Linux carries
    the parent's peak over fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(key + ":")).split()[1])
    except OSError:  # not Linux: the lifetime peak (macOS reports bytes), or 0 for the baseline
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak // 1024 if sys.platform == "darwin" else peak) if key == "VmHWM" else 0


def _reset_peak_kib() -> int:
    """Reset VmHWM to the current RSS where the kernel allows it; return the current RSS (KiB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kib("VmRSS")


# --- orchestration ----------------------------------------------------------------------------------

def jobs(args) -> list[str]:
    out = []
    for v in args.variant_list:
        out += [f"plain:{a}" for a in args.attns] if v == "plain" else [v]
    if args.baseline not in args.variant_list:
        raise SystemExit(f"--baseline {args.baseline} is not among --variants {args.variant_list}")
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    cmd = [sys.executable, os.path.abspath(__file__)] + (sys.argv[1:] if argv is None else list(argv))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                        os.environ.get("PYTHONPATH", "")])}
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    results: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        for job in jobs(args):
            proc = subprocess.run(cmd + ["--worker", job], capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"variant {job} failed (exit {proc.returncode})")
            res = json.loads(line[-1][7:])
            results.setdefault(job, []).append(res)
            print(f"[{r + 1}/{args.repeats}] {job}: {res['tokens_per_s_median']:.0f} tokens/s, "
                  f"{res['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    print(table(args, results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "results": results}, f, indent=1)


def train_flops_per_token(cfg, seq: int) -> float:
    """Training FLOPs per token, PaLM's count (appendix B): 6 x the matmul parameters (the output layer included,
    tied or not; the embedding lookup is free) + 12 x layers x heads x head_dim x seq for attention."""
    h, layers, heads = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    per_layer = h * hd * (heads + 2 * kv) + heads * hd * h + 3 * h * cfg.intermediate_size
    return 6.0 * (layers * per_layer + cfg.vocab_size * h) + 12.0 * layers * heads * hd * seq


def peak_tflops(args, device_name: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None) if args.device == "cuda" else None


def summarize(args, results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per job: medians over repeats, TFLOP/s, MFU, and ratios against the --baseline variant."""
    med = {job: {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s_median", "tokens_per_s", "peak_mib")}
           for job, runs in results.items()}
    base = med.get(f"plain:{args.attns[0]}" if args.baseline == "plain" else args.baseline)
    flops = train_flops_per_token(model_config(args), args.seq)
    for job, m in med.items():
        peak = peak_tflops(args, results[job][0].get("device_name", ""))
        m["tflops"] = m["tokens_per_s_median"] * flops / 1e12
        m["mfu"] = m["tflops"] / peak if peak else None
        m["speed_ratio"] = m["tokens_per_s_median"] / base["tokens_per_s_median"] if base else None
        m["memory_ratio"] = m["peak_mib"] / base["peak_mib"] if base and base["peak_mib"] > 0 else None
    return med


def table(args, results: dict[str, list[dict]]) -> str:
    med = summarize(args, results)
    cfg = model_config(args)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"{args.arch if not args.config_from else cfg.model_type}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} "
        f"layers, vocab {cfg.vocab_size}; batch {args.batch} x seq {args.seq}; {args.device} {args.precision}; "
        f"{args.steps} timed steps after {args.warmup} warmup, median of {args.repeats} run(s); "
        f"{args.clock} clock, threads {args.threads or 'default'}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', '-') if args.omp_wait_policy == 'inherit' else args.omp_wait_policy.upper()}"
        + (", talr layers compiled" if args.compile_layers else ""),
        "",
        f"| variant | attn | tokens/s (median step) | tokens/s (mean) | peak memory MiB | TFLOP/s | MFU | "
        f"speed vs {args.baseline} | memory vs {args.baseline} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for job, m in med.items():
        variant, _, attn = job.partition(":")
        lines.append(f"| {variant} | {attn or args.attns[0]} | {m['tokens_per_s_median']:.0f} | {m['tokens_per_s']:.0f} | "
                     f"{m['peak_mib']:.0f} | {fmt(m['tflops'], '.3g')} | {fmt(m['mfu'], '.1%')} | "
                     f"{fmt(m['speed_ratio'], '.2f')} | {fmt(m['memory_ratio'], '.2f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
