"""Data-parallel training runs: one run, N worker processes under torchrun, rank 0 keeps the books.

A recipe that declares ``nproc_per_node`` in its defaults can run on several GPUs (or, for tests and
small machines, several CPU processes over gloo). The runner then starts the attempt as
``python -m torch.distributed.run --standalone --nproc_per_node N -m dramaturg.shared.training.worker
RUN_DIR`` instead of one worker (:func:`worker_command`); the same worker command works by hand
under ``torchrun`` too. Each process runs the recipe; the Hugging Face ``Trainer`` wraps the model in
DistributedDataParallel and shards the batches by rank.

What must happen once happens on rank 0 only: the run's state transitions, its events, TensorBoard,
checkpoints and publishing. The other ranks get a :class:`FollowerContext` — the same
:class:`~dramaturg.shared.training.recipe.RunContext` interface, whose writes go to the worker log
instead. Decisions every rank must take together (stop after a cancel, save a checkpoint) are taken on
all ranks from shared values (:func:`any_rank`); work only rank 0 does and the others must wait for
(building a from-scratch base model) runs under :func:`primary_first`.

torch is imported inside the functions: the runner (in the gRPC server) imports this module to build
the command and must stay free of torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dramaturg.shared.training.recipe import RunContext, StateWriter

log = logging.getLogger(__name__)

NPROC_KEY = "nproc_per_node"  # the recipe config key that asks for N processes


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world_size() > 1


def worker_command(python: str, module: str, run_dir: Path, nproc: int) -> list[str]:
    """The command of one attempt: the worker itself, or torchrun starting ``nproc`` of them."""
    if nproc <= 1:
        return [python, "-m", module, str(run_dir)]
    # --standalone: a rendezvous on a free local port, so two runs on one machine do not collide
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, str(run_dir)]


def init_process_group() -> str:
    """Join the torchrun group (gloo on CPU, NCCL for CUDA tensors); returns the backend."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return str(dist.get_backend())
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return backend


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


@contextlib.contextmanager
def primary_first() -> Iterator[None]:
    """Rank 0 runs the block first (writing what the others then read); the others wait for it."""
    if rank() != 0:
        barrier()
    yield
    if rank() == 0:
        barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: a cancel seen by one process stops them all together
    (a rank that stopped alone would leave the others waiting in the next gradient all-reduce)."""
    if not is_distributed():
        return flag
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class FollowerContext(RunContext):
    """The RunContext of ranks 1…N-1: reads what rank 0 writes, writes only to the worker log."""

    is_primary = False

    def report(self, step: int, total_steps: int | None = None, epoch: float | None = None) -> None:
        total = self._progress[1] if total_steps is None else int(total_steps)
        self._progress = (int(step), total, self._progress[2] if epoch is None else float(epoch))

    def log_metrics(self, step: int, epoch: float, values: Any) -> None:
        return None

    def log(self, message: str, level: str = "INFO") -> None:
        self.logger.log(logging.getLevelNamesMapping().get(level.upper(), logging.INFO),
                        "[rank %d] %s", rank(), message)

    def save_checkpoint(self, state_writer: StateWriter, step: int, epoch: float = 0.0,
                        metrics: Any = None, is_best: bool = False) -> str:
        return ""

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("only rank 0 publishes: guard the call with ctx.is_primary")

    @property
    def data_hash(self) -> str:
        return ""

    def close(self) -> None:
        return None


def describe() -> str:
    """One line for the run's log: how many processes, which backend."""
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_initialized() else "none"
    return f"data parallel: {world_size()} processes ({backend}), this is rank {rank()} (pid {os.getpid()})"
