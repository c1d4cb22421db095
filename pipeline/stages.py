"""The inference stage: `Infer`, a callable `__call__(pyarrow.Table) -> pyarrow.Table` like the
tokenizer stage (`pipeline.tokenize.Tokenize`), with its micro-batching and token budget.

Both are testable on a plain Arrow table without Ray; `pipeline.runner.build` wires them into Ray
Data and owns every Ray setting (concurrency, CPUs, GPUs, batch sizes).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.cpu_fusion import fuse_linear_layers
from model.roberta import to_device
from pipeline.tasks import Task, TaskOptions, make_task
from pipeline.tokenize import TOKENS


def micro_batches(lengths: np.ndarray, budget: int, cost=lambda n: n) -> list[np.ndarray]:
    """Row indices sorted by length, cut so that rows x cost(longest) stays within `budget` tokens
    (a single row over budget runs alone). Sorting first keeps padding near zero."""
    order = np.argsort(lengths, kind="stable")
    groups, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or (end + 1 - start) * cost(int(lengths[order[end]])) > budget:
            groups.append(order[start:end])
            start = end
    return groups


def pad(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather `rows` of a flat list<int32> column into right-padded ids and mask, both (B, T)."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    T = int(lengths.max())
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    mask = np.arange(T)[None, :] < lengths[:, None]  # (B, T)
    ids[mask] = values[np.repeat(starts - np.cumsum(np.r_[0, lengths[:-1]]), lengths) + np.arange(lengths.sum())]
    return ids, mask.astype(np.int64)


def to_host(parts: list[torch.Tensor | np.ndarray]) -> np.ndarray:
    """One output's micro-batch parts -> one numpy array. For device tensors this is the call's one
    wait for the GPU: until then the host cuts, pads and queues the next micro-batches while the GPU
    computes (reading each result back at once left the GPU idle while the host prepared the next)."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts).cpu().numpy()
    return np.concatenate(parts)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but this worker has no CUDA device; use --device auto or cpu")
    return torch.device(device)


# The attention kernels inference may use: all but cuDNN's, which torch prefers on Hopper GPUs for a
# masked attention and which builds an execution plan for every new (rows, length) shape. Length-
# sorted micro-batches bring new shapes all the time: measured on an H200 (classify, roberta-base
# shape, bf16, 20,000 rows), a first pass ran at 626k tokens/s with cuDNN, 1.85M on a second pass
# over the same shapes, and 1.66M with the memory-efficient kernel, which has no per-shape set-up.
# CPUs have neither, so there this changes nothing.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
MAX_BUDGET = 2**16  # tokens: a GPU is saturated well before; bigger micro-batches only cost memory
MIN_BUDGET = 64  # tokens: below this, halving after an out-of-memory gives up
CPU_ACTIVATION_LIMIT = 32 * 2**20  # bytes: see token_budget


def token_budget(config, dtype: torch.dtype, device: torch.device) -> int:
    """The micro-batch size in tokens (padded positions, copies for pseudo-LL) when --batch-tokens
    is not given: a power of two.

    CPU: the largest activation, the MLP's (tokens, intermediate) tensor, counted at fp32's 4 bytes
    whatever the dtype, stays within CPU_ACTIVATION_LIMIT. Measured on the benchmark's models
    (model stage, classify unless said, tokens/s): on glibc's malloc, small fp32, 8,192 tokens ran
    15% slower than 4,096 (above 32 MiB every allocation was a fresh mmap whose pages fault in). On
    jemalloc, the inference actor's allocator (fresh processes, two runs each, before the fused
    Linear layers of model/cpu_fusion.py): small fp32 2,048: 7,013 / 7,101, 4,096: 6,811 / 7,250,
    8,192: 6,577 / 7,034; small bf16 2,048: 11,538 / 12,051, 4,096: 11,411 / 11,298 / 12,043 /
    10,880, 8,192: 10,285 / 9,955, 16,384: 9,401 / 9,234; base fp32 2,048: 986 / 969, 4,096: 952 /
    933; pseudo-LL small bf16 4,096: 274 / 277, 8,192: 277 / 264. bf16 is as fast at 2,048 as at
    4,096, and 10% slower at the 8,192 it got when counted at its own 2 bytes. 32 MiB is also this
    machine's L3 cache.

    GPU: a quarter of the free memory over a rough size of the activations alive at once per token,
    (8 H + 2 I) elements, capped at MAX_BUDGET (an H200 gets the cap for roberta-base); a CUDA
    out-of-memory halves it (Infer.run_rows)."""
    if device.type == "cpu":
        tokens = CPU_ACTIVATION_LIMIT // (config.intermediate_size * 4)
    else:
        free, _ = torch.cuda.mem_get_info(device)
        tokens = free // 4 // ((8 * config.hidden_size + 2 * config.intermediate_size) * dtype.itemsize)
    return min(MAX_BUDGET, 1 << max(int(tokens), MIN_BUDGET).bit_length() - 1)


NON_FINITE = ("the model's output is not finite (NaN or inf), so no result is given: with --dtype float16 "
              "activations can overflow (use bfloat16 or float32), and so can embeddings stored as "
              "--embedding-dtype float16 (use --normalize or float32)")


class Infer:
    """Runs a task's model over each block of `Tokenize`'s output (input_ids and error are the
    columns it reads): rows sorted by length, cut into micro-batches by a token budget, run, and put
    back in their original order. The model loads once per actor.
    batch_tokens: the budget; None chooses it from the device (`token_budget`)."""

    def __init__(self, model_dir: str, task: str, options: TaskOptions | None = None, dtype: str = "float32",
                 device: str = "auto", batch_tokens: int | None = None):  # fmt: skip
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS to an actor's CPU reservation (1 for our fractional 1/4), so
            # torch would compute on one core (measured: half the throughput on two). The model
            # gets every core this process may use: one CPU inference actor per node.
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        self.task: Task = make_task(task, model_dir, options)
        self.task.check()
        self.model = self.task.load(dtype, self.device)
        # On the CPU, oneDNN matmuls with the bias and GELU fused: model stage +9% (model/cpu_fusion.py;
        # it leaves a GPU model alone).
        fuse_linear_layers(self.model)
        self.pad_id = self.model.config.pad_token_id
        self.budget = batch_tokens or token_budget(self.model.config, self.model.dtype, self.device)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        if not batch.num_rows:
            return batch.drop_columns([TOKENS])
        column = batch[TOKENS].combine_chunks()
        values = column.values.to_numpy(zero_copy_only=False)
        offsets = column.offsets.to_numpy().astype(np.int64)
        parts, order = [], []
        for done, outputs in self.run_rows(values, offsets, np.arange(batch.num_rows)):
            parts.append(outputs)
            order.append(done)
        batch = batch.drop_columns([TOKENS])
        inverse = np.argsort(np.concatenate(order))  # sorted position of each original row
        outputs = {k: to_host([p[k] for p in parts])[inverse] for k in parts[0]}
        errors = batch["error"]
        non_finite = self.task.non_finite(outputs)
        if non_finite.any():  # in place: every block's columns keep one order
            errors = pc.if_else(pa.array(non_finite), pa.scalar(NON_FINITE, pa.string()), errors)
            batch = batch.set_column(batch.schema.get_field_index("error"), "error", errors)
        failed = pc.is_valid(errors) if errors.null_count < batch.num_rows else None
        for name, array in self.task.columns(outputs).items():
            if failed is not None:
                array = pc.if_else(failed, pa.nulls(len(array), array.type), array)  # no made-up results
            batch = batch.append_column(name, array)
        return batch

    def run_rows(self, values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, retried: bool = False):
        """Yields (rows, outputs) per micro-batch: `rows` over the budget are cut by `micro_batches`
        first. A CUDA out-of-memory halves the budget, for the rest of this actor's life, and runs
        the same rows again, cut smaller. A single row that the task cannot cut (`splits_rows`) is
        run once more with the budget as it was (after freeing the cached memory: the first failure
        may have been fragmentation), then it is an error naming its length."""
        lengths = offsets[rows + 1] - offsets[rows]
        if len(rows) > 1 and len(rows) * self.task.cost(int(lengths.max())) > self.budget:
            for part in micro_batches(lengths, self.budget, self.task.cost):
                yield from self.run_rows(values, offsets, rows[part])
            return
        ids, mask = (to_device(x, self.device) for x in pad(values, offsets, rows, self.pad_id))
        try:
            with sdpa_kernel(ATTENTION_BACKENDS):
                outputs = self.task.run(self.model, ids, mask, lengths, self.budget)
        except torch.OutOfMemoryError as e:
            alone = len(rows) == 1 and not self.task.splits_rows
            if alone and retried:
                raise torch.OutOfMemoryError(f"one row of {int(lengths[0])} tokens does not fit in this GPU's memory even "
                                             "alone; lower --max-length (max_length= in the Python API), or use a GPU "
                                             "with more memory") from e  # fmt: skip
            if not alone and self.budget // 2 < MIN_BUDGET:
                raise
        else:
            yield rows, outputs
            return
        # Retried outside the except block: its traceback would keep the failed batch's tensors alive.
        del ids, mask
        torch.cuda.empty_cache()
        if not alone:
            self.budget //= 2
        yield from self.run_rows(values, offsets, rows, retried=alone)
