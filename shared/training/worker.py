"""``python -m dramaturg.shared.training.worker RUN_DIR``: run one attempt of a training run.

The runner starts this in its own process (and session) so that whatever the recipe does — a CUDA
OOM, a segfault in a native extension, a runaway allocation — ends here and not in the gRPC server.
The worker reads ``run.json``, imports the service's recipes, runs the recipe with a RunContext and
writes the outcome. SIGTERM/SIGINT ask the recipe to stop (``ctx.cancelled()``); the CANCEL marker
file tells a cancel (terminal CANCELLED) from a shutdown (the run stays resumable, exit status 75).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType

from dramaturg.shared.store import ModelStore
from dramaturg.shared.training import distributed
from dramaturg.shared.training.recipe import RunContext, load_recipes
from dramaturg.shared.training.runs import (
    CANCEL_MARKER,
    CANCELLED,
    EVENTS_FILE,
    EXIT_PREEMPTED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    EventLog,
    RunRecord,
    list_checkpoints,
    load_run,
    process_start_time,
    run_lock,
    save_run,
    transition,
    update_run,
)

log = logging.getLogger("dramaturg.training.worker")


class _Stop:
    """Signal state shared with the RunContext once it exists (a signal may arrive before)."""

    def __init__(self) -> None:
        self.requested = False
        self.ctx: RunContext | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        log.info("received %s: asking the recipe to stop", signal.Signals(signum).name)
        self.requested = True
        if self.ctx is not None:
            self.ctx.request_stop()


def _finish(run_dir: Path, events: EventLog, state: str, error: str = "") -> None:
    with run_lock(run_dir):
        record = load_run(run_dir)
        transition(record, events, state, error=error)
        save_run(record)


def run_follower(run_dir: Path, stop: _Stop) -> int:
    """Ranks 1…N-1 of a data-parallel attempt: run the recipe beside rank 0, keep no books."""
    record = load_run(run_dir)
    events = EventLog(run_dir / EVENTS_FILE, record.run_id, attempt=record.attempts)
    ctx = distributed.FollowerContext(record, events, None)
    stop.ctx = ctx
    if stop.requested:
        ctx.request_stop()
    try:
        distributed.init_process_group()
        log.info("run %s: %s", record.run_id, distributed.describe())
        recipe = load_recipes(record.recipes_import_path)[record.recipe]
        recipe.run(ctx)
    except BaseException:
        log.exception("rank %d: recipe %s failed", distributed.rank(), record.recipe)
        return 1
    return 0


def run(run_dir: Path) -> int:
    """One attempt; returns the exit status (0 done, 1 failed, 75 preempted and resumable)."""
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if distributed.rank() > 0:
        return run_follower(run_dir, stop)

    with run_lock(run_dir):
        record = load_run(run_dir)
        if record.terminal:
            log.info("run %s is already %s; nothing to do", record.run_id, record.state)
            return 0
        events = EventLog(run_dir / EVENTS_FILE, record.run_id, attempt=record.attempts)
        record.pid, record.pid_start_time = os.getpid(), process_start_time(os.getpid())
        record.preempted = False
        transition(record, events, RUNNING)
        save_run(record)
    log.info("run %s: recipe %s, attempt %d", record.run_id, record.recipe, record.attempts)

    ctx: RunContext | None = None
    error = ""
    try:
        recipes = load_recipes(record.recipes_import_path)
        recipe = recipes.get(record.recipe)
        if recipe is None:
            raise LookupError(f"recipe {record.recipe!r} is not in {record.recipes_import_path}")
        checkpoints = list_checkpoints(run_dir)
        purge_step = None
        if checkpoints:
            last = checkpoints[-1]
            purge_step = last.step + 1
            events.message(f"attempt {record.attempts}: resuming from checkpoint {last.checkpoint_id} "
                           f"(step {last.step})")
            resumed = {"checkpoint_id": last.checkpoint_id, "step": last.step}

            def mark(rec: RunRecord) -> None:
                rec.resumed_from = resumed

            record = update_run(run_dir, mark)
        store = ModelStore(record.store_root) if record.store_root else None
        ctx = RunContext(record, events, store, purge_step=purge_step)
        stop.ctx = ctx
        if stop.requested:
            ctx.request_stop()
        if distributed.is_distributed():
            distributed.init_process_group()
            ctx.log(distributed.describe())
        recipe.run(ctx)
    except SystemExit as err:
        if err.code not in (0, None):
            error = f"recipe exited with status {err.code}"
    except BaseException as err:  # the worker's job is to record any failure, whatever its type
        error = f"{type(err).__name__}: {err}"
        log.exception("recipe %s failed", record.recipe)
        events.message("".join(traceback.format_exception(err))[-4000:], "ERROR")
    finally:
        if ctx is not None:
            try:
                ctx.close()
            except Exception:
                log.exception("could not flush the run context")

    cancelled = (run_dir / CANCEL_MARKER).exists()
    stopping = stop.requested or (ctx is not None and ctx.cancelled())
    if cancelled:
        _finish(run_dir, events, CANCELLED)
        return 0
    if stopping:
        # Not a cancel: the server (or the host) is shutting down. Leave the run RUNNING so the next
        # runner's recover() resumes it from its latest checkpoint.
        events.message("stopped for shutdown; the run resumes from its latest checkpoint on restart")

        def preempt(rec: RunRecord) -> None:
            rec.preempted = True

        update_run(run_dir, preempt)
        return EXIT_PREEMPTED
    if error:
        _finish(run_dir, events, FAILED, error=error)
        return 1
    _finish(run_dir, events, SUCCEEDED)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args) != 1:
        log.error("usage: python -m dramaturg.shared.training.worker RUN_DIR")
        return 2
    return run(Path(args[0]).resolve())


if __name__ == "__main__":
    sys.exit(main())
