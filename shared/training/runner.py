"""Run training recipes as supervised subprocesses, written once for every service.

On-disk layout (``ROOT`` is ``DRAMATURG_HOME``)::

    ROOT/runs/<service>/<run_id>/run.json          state (atomic replace, flock'd read-modify-write)
    ROOT/runs/<service>/<run_id>/events.jsonl      numbered events (append + flush, flock'd)
    ROOT/runs/<service>/<run_id>/worker.log        stdout/stderr of every attempt
    ROOT/runs/<service>/<run_id>/tensorboard/      SummaryWriter event files (the run's log_dir)
    ROOT/runs/<service>/<run_id>/checkpoints/<step-00000120>/  checkpoint.json + the recipe's files
    ROOT/runs/<service>/.requests/<sha256(request_id)>         request_id → run_id (idempotency)

Each attempt of a run is ``python -m dramaturg.shared.training.worker RUN_DIR`` in its own session:
a crash, an OOM kill or a hung CUDA context ends the worker, never the server. The runner keeps no
state that is not on disk, so a new runner on the same root can :meth:`TrainingRunner.recover`:
runs whose worker is gone (dead pid, or a pid reused by another process — the kernel start time is
stored beside the pid) are started again and resume from their latest checkpoint.

Locking rule: the runner's thread lock may be held while taking a run's file lock, never the reverse.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dramaturg.shared.grpc.errors import (
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    unavailable,
)
from dramaturg.shared.store import (
    ModelRecord,
    ModelRefLike,
    ModelStore,
    atomic_write_json,
    file_lock,
    parse_ref,
)
from dramaturg.shared.training import distributed
from dramaturg.shared.training.recipe import Recipe, load_recipes, local_path, merge_config
from dramaturg.shared.training.runs import (
    CANCEL_MARKER,
    CANCELLED,
    CHECKPOINT_META,
    CHECKPOINTS_DIR,
    EVENTS_FILE,
    EXIT_PREEMPTED,
    FAILED,
    PREEMPT_MARKER,
    QUEUED,
    RUN_ID_RE,
    TENSORBOARD_DIR,
    TERMINAL_STATES,
    TRAINER_STATE_DIR,
    WORKER_LOG,
    CheckpointInfo,
    EventLog,
    EventTail,
    RunRecord,
    last_state_event,
    list_checkpoints,
    load_run,
    process_alive,
    process_start_time,
    read_events,
    read_json,
    run_lock,
    save_run,
    signal_process,
    transition,
)

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger(__name__)

WORKER_MODULE = "dramaturg.shared.training.worker"


@dataclass
class _Worker:
    """A worker process this runner watches: one it started (``proc``) or one it adopted (pid only)."""

    run_id: str
    pid: int
    start_time: int | None
    proc: subprocess.Popen[bytes] | None = None


class TrainingRunner:
    """Start, follow, cancel and recover training runs of one service.

    ``max_concurrent`` workers run at once (GPUs are the limit); more runs wait QUEUED. A worker that
    dies unexpectedly (killed, segfault) while this runner watches is restarted from its latest
    checkpoint up to ``max_attempts`` times; a recipe that raises fails the run at once, since running
    the same code again would raise again.
    """

    def __init__(self, root: str | Path, service: str, recipes_import_path: str, store: ModelStore,
                 max_concurrent: int = 1, *, grace_seconds: float = 10.0, max_attempts: int = 3,
                 python: str | None = None, extra_pythonpath: Sequence[str | Path] = ()) -> None:
        self.root = Path(root).expanduser()
        self.service = service
        self.recipes_import_path = recipes_import_path
        self.store = store
        self.max_concurrent = max(1, int(max_concurrent))
        self.grace_seconds = grace_seconds
        self.max_attempts = max(1, int(max_attempts))
        self.python = python or sys.executable
        self.runs_dir = self.root / "runs" / service
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        (self.runs_dir / ".requests").mkdir(exist_ok=True)
        self._env = self._worker_env(extra_pythonpath)
        self._lock = threading.RLock()
        self._start_lock = threading.Lock()
        self._active: dict[str, _Worker] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._queue: list[str] = []
        self._recipes: dict[str, Recipe] | None = None
        self._closing = False   # close(stop_workers=True): exits leave runs resumable, nothing new starts
        self._detached = False  # close(stop_workers=False): stop watching, leave workers alone

    # ------------------------------------------------------------------------------------- recipes

    def recipes(self) -> dict[str, Recipe]:
        """The service's recipes, imported once (in the server: to list them and validate requests)."""
        if self._recipes is None:
            self._recipes = load_recipes(self.recipes_import_path)
        return self._recipes

    # --------------------------------------------------------------------------------------- start

    def start(self, recipe: str, dataset_uri: str, overrides: Mapping[str, Any] | None = None,
              output_model: str = "", base_model: ModelRefLike | None = None,
              request_id: str = "") -> RunRecord:
        """Create a run (QUEUED) and start its worker when a slot is free.

        The same ``request_id`` returns the run it created before (ALREADY_EXISTS when the other
        parameters differ, since silently returning a different run would hide a client bug).
        """
        if self._closing or self._detached:
            raise unavailable("the training runner is shutting down")
        recipes = self.recipes()
        chosen = recipes.get(recipe)
        if chosen is None:
            known = ", ".join(sorted(recipes)) or "none"
            raise invalid_argument("recipe",
                                   f"unknown recipe {recipe!r}; the {self.service} service knows: {known}")
        overrides = dict(overrides or {})
        config = merge_config(chosen.defaults, overrides)
        dataset = self._check_dataset(dataset_uri)
        if output_model:
            name, version = parse_ref(output_model)
            if version or not name:
                raise invalid_argument("output_model",
                                       "a model name without a version (versions are assigned)")
        base_ref, base_path = "", ""
        if base_model is not None and parse_ref(base_model)[0]:
            base = self.store.resolve(self.service, base_model)
            base_ref, base_path = base.ref, str(base.path)
        elif isinstance(config.get("base_model"), str):
            base_ref = config["base_model"]
        architecture = getattr(chosen, "architecture", "") or str(config.get("architecture", "") or "")

        with self._start_lock, file_lock(self.runs_dir / ".lock"):
            if request_id:
                existing = self._lookup_request(request_id)
                if existing is not None:
                    asked = (recipe, dataset, overrides, output_model)
                    had = (existing.recipe, existing.dataset_uri, existing.overrides, existing.output_model)
                    if asked != had:
                        raise already_exists("request_id", request_id,
                                             hint=f"it started run {existing.run_id} with other parameters")
                    return existing
            run_id = self._new_run_id()
            run_dir = self.runs_dir / run_id
            run_dir.mkdir()
            if request_id:  # index first: a crash before run.json leaves a dangling index, which is ignored
                atomic_write_json(self._request_path(request_id),
                                  {"request_id": request_id, "run_id": run_id})
            (run_dir / CHECKPOINTS_DIR).mkdir()
            (run_dir / TENSORBOARD_DIR).mkdir()
            record = RunRecord(
                run_id=run_id, service=self.service, recipe=recipe, run_dir=run_dir, dataset_uri=dataset,
                overrides=overrides, config=config, output_model=output_model, base_model=base_ref,
                base_model_path=base_path, architecture=architecture, request_id=request_id,
                created_at=time.time(), store_root=str(self.store.root),
                recipes_import_path=self.recipes_import_path,
            )
            with run_lock(run_dir):
                transition(record, EventLog(run_dir / EVENTS_FILE, run_id), QUEUED)
                save_run(record)
        log.info("%s: run %s created (recipe %s, dataset %s)", self.service, run_id, recipe, dataset)
        with self._lock:
            self._queue.append(run_id)
        self._schedule()
        return self.get(run_id)

    def _check_dataset(self, dataset_uri: str) -> str:
        if not dataset_uri:
            raise invalid_argument("dataset_uri", "required: the folder or manifest the recipe trains on")
        path = local_path(dataset_uri)
        if path is None:
            raise invalid_argument("dataset_uri",
                                   f"{dataset_uri!r}: only local paths and file:// URIs are read")
        path = path.absolute()
        if not path.exists():
            raise not_found("dataset", str(path),
                            hint="dataset_uri must name a folder or file the server can read")
        return str(path)

    def _new_run_id(self) -> str:
        while True:
            run_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
            if not (self.runs_dir / run_id).exists():
                return run_id

    def _request_path(self, request_id: str) -> Path:
        return self.runs_dir / ".requests" / f"{hashlib.sha256(request_id.encode()).hexdigest()[:40]}.json"

    def _lookup_request(self, request_id: str) -> RunRecord | None:
        try:
            entry = read_json(self._request_path(request_id))
            record = load_run(self.runs_dir / entry["run_id"])
        except (OSError, ValueError, KeyError):
            return None
        return record if record.request_id == request_id else None

    # -------------------------------------------------------------------------------------- launch

    def _worker_env(self, extra: Sequence[str | Path]) -> dict[str, str]:
        """The server's environment, plus its import path: recipes importable here import in the worker."""
        prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
        paths = [str(Path(p).absolute()) for p in extra]
        for entry in sys.path:
            full = os.path.abspath(entry or os.curdir)
            if os.path.isdir(full) and not full.startswith(prefixes) and "-packages" not in full:
                paths.append(full)
        env = dict(os.environ)
        if env.get("PYTHONPATH"):
            paths.extend(env["PYTHONPATH"].split(os.pathsep))
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
        env["PYTHONUNBUFFERED"] = "1"
        env["DRAMATURG_HOME"] = str(self.root)
        return env

    def _schedule(self) -> None:
        """Start queued runs while slots are free."""
        with self._lock:
            while self._queue and len(self._active) < self.max_concurrent:
                if self._closing or self._detached:
                    return
                run_id = self._queue.pop(0)
                try:
                    self._launch(run_id)
                except Exception as err:
                    log.exception("could not start the worker of run %s", run_id)
                    self._fail(run_id, f"could not start the worker: {err}")

    def _launch(self, run_id: str) -> None:
        run_dir = self.runs_dir / run_id
        with run_lock(run_dir):
            record = load_run(run_dir)
            if record.terminal:
                return
            if record.pid and process_alive(record.pid, record.pid_start_time):
                adopt = _Worker(run_id, record.pid, record.pid_start_time)
            else:
                adopt = None
                (run_dir / PREEMPT_MARKER).unlink(missing_ok=True)
                record.attempts += 1
                record.preempted = False
                with open(run_dir / WORKER_LOG, "ab") as worker_log:
                    worker_log.write(f"--- attempt {record.attempts} ---\n".encode())
                    worker_log.flush()
                    nproc = int(record.config.get(distributed.NPROC_KEY, 1) or 1)
                    proc = subprocess.Popen(
                        distributed.worker_command(self.python, WORKER_MODULE, run_dir, nproc),
                        cwd=run_dir, env=self._env,
                        stdin=subprocess.DEVNULL, stdout=worker_log, stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group: SIGKILL takes its children too
                    )
                record.pid, record.pid_start_time = proc.pid, process_start_time(proc.pid)
                save_run(record)
        worker = adopt or _Worker(run_id, record.pid or 0, record.pid_start_time, proc)
        log.info("%s run %s: %s worker pid %d (attempt %d)", self.service, run_id,
                 "adopted" if adopt else "started", worker.pid, record.attempts)
        self._watch_worker(worker)

    def _watch_worker(self, worker: _Worker) -> None:
        with self._lock:
            self._active[worker.run_id] = worker
            thread = threading.Thread(target=self._supervise, args=(worker,), daemon=True,
                                      name=f"train-{worker.run_id}")
            self._threads[worker.run_id] = thread
        thread.start()

    def _supervise(self, worker: _Worker) -> None:
        returncode: int | None = None
        if worker.proc is not None:
            returncode = worker.proc.wait()
        else:  # adopted: not our child, so poll
            while not self._detached and process_alive(worker.pid, worker.start_time):
                time.sleep(0.5)
        try:
            self._on_exit(worker, returncode)
        except Exception:
            log.exception("could not record the end of run %s", worker.run_id)

    def _on_exit(self, worker: _Worker, returncode: int | None) -> None:
        with self._lock:
            if self._active.get(worker.run_id) is worker:
                del self._active[worker.run_id]
            if self._threads.get(worker.run_id) is threading.current_thread():
                del self._threads[worker.run_id]
        if self._detached:
            return
        run_dir = self.runs_dir / worker.run_id
        restart = False
        with run_lock(run_dir):
            record = load_run(run_dir)
            if record.pid != worker.pid:
                return  # another runner already restarted it
            events = EventLog(run_dir / EVENTS_FILE, record.run_id, attempt=record.attempts)
            if record.terminal:
                pass
            elif record.cancel_requested or (run_dir / CANCEL_MARKER).exists():
                transition(record, events, CANCELLED)
            elif self._closing:
                record.preempted = True  # resumed by the next runner's recover()
            elif record.preempted or returncode == EXIT_PREEMPTED:
                events.message("the worker was stopped from outside; resuming from the latest checkpoint")
                transition(record, events, QUEUED)
                restart = True
            elif returncode is not None and returncode >= 0:
                tail = _tail(run_dir / WORKER_LOG)
                transition(record, events, FAILED,
                           error=f"worker exited with status {returncode} without a result: {tail}")
            else:
                record.crashes += 1
                why = _describe_exit(returncode)
                if record.crashes < self.max_attempts:
                    events.message(f"worker {why}; restarting from the latest checkpoint (crash "
                                   f"{record.crashes}, at most {self.max_attempts - 1} restarts)", "WARNING")
                    transition(record, events, QUEUED)
                    restart = True
                else:
                    transition(record, events, FAILED,
                               error=f"worker {why}; gave up after {record.attempts} attempts")
            save_run(record)
        log.info("%s run %s: worker pid %d ended (%s), run %s", self.service, worker.run_id, worker.pid,
                 _describe_exit(returncode), record.state)
        if restart:
            with self._lock:
                self._queue.insert(0, worker.run_id)
        self._schedule()

    def _fail(self, run_id: str, error: str) -> None:
        run_dir = self.runs_dir / run_id
        with run_lock(run_dir):
            record = load_run(run_dir)
            if not record.terminal:
                events = EventLog(run_dir / EVENTS_FILE, run_id, record.attempts)
                transition(record, events, FAILED, error=error)
                save_run(record)

    # ------------------------------------------------------------------------------------- recover

    def recover(self) -> list[str]:
        """Pick up runs a previous server left behind; returns the ids resumed, queued or adopted.

        A live worker (same pid *and* kernel start time) is adopted and watched; a dead one's run is
        queued again and its next attempt resumes from its latest checkpoint. A run whose event log
        already ends in a terminal state (the worker finished just before the crash) is closed instead.
        """
        picked: list[str] = []
        for record in sorted(self._scan(), key=lambda r: (r.created_at, r.run_id)):  # oldest first
            if record.terminal:
                continue
            with self._lock:
                if record.run_id in self._active or record.run_id in self._queue:
                    continue
            run_dir = record.run_dir
            adopt: _Worker | None = None
            queue = False
            with run_lock(run_dir):
                record = load_run(run_dir)
                if record.terminal:
                    continue
                events = EventLog(run_dir / EVENTS_FILE, record.run_id, attempt=record.attempts)
                last = last_state_event(run_dir)
                if record.pid and process_alive(record.pid, record.pid_start_time):
                    adopt = _Worker(record.run_id, record.pid, record.pid_start_time)
                elif last is not None and last.get("state") in TERMINAL_STATES:
                    record.state, record.finished_at = last["state"], float(last.get("time", time.time()))
                    record.error = record.error or str(last.get("error", ""))
                elif record.cancel_requested or (run_dir / CANCEL_MARKER).exists():
                    transition(record, events, CANCELLED)
                elif record.state == QUEUED:
                    queue = True  # never started, or a restart (already counted) that never launched
                else:
                    if not record.preempted:
                        record.crashes += 1
                    if record.crashes >= self.max_attempts:
                        transition(record, events, FAILED,
                                   error=f"worker died {record.crashes} times; gave up after "
                                         f"{record.attempts} attempts")
                    else:
                        how = "was stopped for a shutdown" if record.preempted else "is gone"
                        events.message(f"the worker of attempt {record.attempts} (pid {record.pid}) {how}; "
                                       "resuming from the latest checkpoint", "WARNING")
                        transition(record, events, QUEUED)
                        queue = True
                save_run(record)
            if adopt is not None:
                log.info("%s run %s: adopting live worker pid %d", self.service, record.run_id, adopt.pid)
                self._watch_worker(adopt)
                picked.append(record.run_id)
            elif queue:
                with self._lock:
                    self._queue.append(record.run_id)
                picked.append(record.run_id)
        self._schedule()
        return picked

    # ---------------------------------------------------------------------------------------- read

    def _run_dir(self, run_id: str) -> Path:
        if not RUN_ID_RE.match(run_id or ""):
            raise invalid_argument("run_id", f"malformed run id {run_id!r}")
        run_dir = self.runs_dir / run_id
        if not (run_dir / "run.json").exists():
            raise not_found("training run", run_id)
        return run_dir

    def get(self, run_id: str) -> RunRecord:
        return load_run(self._run_dir(run_id))

    def _scan(self) -> list[RunRecord]:
        records: list[RunRecord] = []
        for entry in self.runs_dir.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                records.append(load_run(entry))
            except (OSError, ValueError, TypeError) as err:
                if (entry / "run.json").exists():
                    log.warning("skipping unreadable run %s: %s", entry, err)
        return records

    def events(self, run_id: str, after_sequence: int = 0) -> list[dict[str, Any]]:
        """Every event recorded so far with a sequence above ``after_sequence``."""
        return read_events(self._run_dir(run_id), after_sequence)

    async def watch(self, run_id: str, after_sequence: int = 0, *,
                    poll_interval: float = 0.1) -> AsyncIterator[dict[str, Any]]:
        """Replay the events after ``after_sequence``, then follow the log until the run ends.

        Ends after the terminal state event, or once ``run.json`` is terminal and the log is read to
        its end (a terminal run.json implies its event was appended first).
        """
        run_dir = self._run_dir(run_id)
        tail = EventTail(run_dir / EVENTS_FILE, after_sequence)
        while True:
            batch = tail.poll()
            for event in batch:
                yield event
                if event.get("type") == "state" and event.get("state") in TERMINAL_STATES:
                    return
            if not batch:
                if load_run(run_dir).terminal:
                    for event in tail.poll():  # appended between our last read and the state change
                        yield event
                    return
                await asyncio.sleep(poll_interval)

    def wait(self, run_id: str, timeout: float | None = None, poll_interval: float = 0.1) -> RunRecord:
        """Block until the run is terminal (for the CLI and tests); TimeoutError after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.get(run_id)
            if record.terminal:
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} is still {record.state} after {timeout} s")
            time.sleep(poll_interval)

    def checkpoints(self, run_id: str) -> list[CheckpointInfo]:
        return list_checkpoints(self._run_dir(run_id))

    # -------------------------------------------------------------------------------------- cancel

    def cancel(self, run_id: str, *, wait: bool = True) -> RunRecord:
        """Stop a run: SIGTERM (the recipe sees ``cancelled()``), SIGKILL of its group after the grace.

        With ``wait`` it returns once the worker is gone and the run is CANCELLED (or finished first).
        """
        run_dir = self._run_dir(run_id)
        record = load_run(run_dir)
        if record.state == CANCELLED:
            return record
        if record.terminal:
            raise failed_precondition(f"run {run_id} already finished ({record.state})",
                                      reason="RUN_FINISHED")
        (run_dir / CANCEL_MARKER).touch()
        with self._lock:
            if run_id in self._queue:
                self._queue.remove(run_id)
        alive = False
        with run_lock(run_dir):
            record = load_run(run_dir)
            if record.terminal:
                return record
            events = EventLog(run_dir / EVENTS_FILE, run_id, attempt=record.attempts)
            record.cancel_requested = True
            events.message("cancel requested")
            pid, start_time = record.pid, record.pid_start_time
            alive = bool(pid) and process_alive(pid, start_time)
            if not alive:
                transition(record, events, CANCELLED)
            save_run(record)
        if alive and pid:
            if wait:
                self._stop_process(run_id, pid, start_time)
                return self._wait_state(run_id, self.grace_seconds + 10.0)
            threading.Thread(target=self._stop_process, args=(run_id, pid, start_time), daemon=True,
                             name=f"cancel-{run_id}").start()
        return load_run(run_dir)

    def _stop_process(self, run_id: str, pid: int, start_time: int | None) -> None:
        signal_process(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        while process_alive(pid, start_time) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(pid, start_time):
            log.warning("run %s: worker pid %d ignored SIGTERM for %.0f s; killing its process group",
                        run_id, pid, self.grace_seconds)
            signal_process(pid, signal.SIGKILL, group=True)
            deadline = time.monotonic() + 10.0
            while process_alive(pid, start_time) and time.monotonic() < deadline:
                time.sleep(0.05)
        with self._lock:
            watched = run_id in self._active and self._active[run_id].pid == pid
        if not watched:  # nobody supervises it here: record the cancel ourselves
            run_dir = self.runs_dir / run_id
            with run_lock(run_dir):
                record = load_run(run_dir)
                if not record.terminal and record.pid == pid:
                    transition(record, EventLog(run_dir / EVENTS_FILE, run_id, record.attempts), CANCELLED)
                    save_run(record)

    def _wait_state(self, run_id: str, timeout: float) -> RunRecord:
        deadline = time.monotonic() + timeout
        record = self.get(run_id)
        while not record.terminal and time.monotonic() < deadline:
            time.sleep(0.05)
            record = self.get(run_id)
        return record

    # ------------------------------------------------------------------------------------ activate

    def activate(self, run_id: str, checkpoint_id: str = "", model_name: str = "") -> ModelRecord:
        """Publish a checkpoint (default: the best, else the newest) into the model store.

        Files under ``trainer_state/`` stay behind: they resume training, they are not the model.
        """
        run_dir = self._run_dir(run_id)
        record = load_run(run_dir)
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise failed_precondition(f"run {run_id} has no checkpoints yet", reason="NO_CHECKPOINT")
        if checkpoint_id:
            chosen = next((c for c in checkpoints if c.checkpoint_id == checkpoint_id), None)
            if chosen is None:
                raise not_found("checkpoint", checkpoint_id,
                                hint=f"run {run_id} has: {', '.join(c.checkpoint_id for c in checkpoints)}")
        else:
            chosen = next((c for c in reversed(checkpoints) if c.best), checkpoints[-1])
        name = model_name or record.output_model or record.recipe
        if parse_ref(name)[1]:
            raise invalid_argument("model_name", "a model name without a version (versions are assigned)")
        try:
            model = self.store.publish_folder(
                self.service, name, chosen.path, exclude=(CHECKPOINT_META, TRAINER_STATE_DIR),
                architecture=record.architecture, base_model=record.base_model, recipe=record.recipe,
                data_hash=record.data_hash, parent=record.base_model if record.base_model_path else "",
                metrics=chosen.metrics,
                labels={"run_id": run_id, "checkpoint_id": chosen.checkpoint_id, "step": str(chosen.step)},
            )
        except (FileNotFoundError, shutil.Error) as err:  # pruned by the running worker while we copied it
            raise not_found("checkpoint", chosen.checkpoint_id,
                            hint="it was pruned; pick a newer one") from err
        with run_lock(run_dir):
            current = load_run(run_dir)
            EventLog(run_dir / EVENTS_FILE, run_id, current.attempts).message(
                f"checkpoint {chosen.checkpoint_id} published as model {model.ref}")
            current.published_model = model.ref
            save_run(current)
        return model

    # ---------------------------------------------------------------------------------------- inline

    def run_inline(self, recipe: str, dataset_uri: str, overrides: Mapping[str, Any] | None = None,
                   output_model: str = "", base_model: ModelRefLike | None = None, request_id: str = "",
                   *, console: Console | None = None) -> RunRecord:
        """Run in the foreground with a rich progress bar (``dramaturg train``); Ctrl+C cancels.

        The recipe still runs in a worker subprocess, exactly as under the server, so what works
        from the CLI works as a service and a crash is reported, not inherited.
        """
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = console or Console(stderr=True)
        record = self.start(recipe, dataset_uri, overrides, output_model, base_model, request_id)
        console.print(f"run {record.run_id}: recipe {recipe} on {record.dataset_uri}")
        console.print(f"TensorBoard: tensorboard --logdir {record.log_dir}")
        tail = EventTail(record.events_path)
        # One bar per run: the phase in the description (_render), its ETA, the latest key metrics.
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   TextColumn("{task.fields[metrics]}"))
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"{self.service} {recipe}", total=None, metrics="",
                                     label=self.service, config=dict(record.config))
            try:
                done = False
                while not done:
                    batch = tail.poll()
                    for event in batch:
                        done = _render(progress, task, recipe, event) or done
                    if not batch and self.get(record.run_id).terminal:
                        done = True
                    if not done:
                        time.sleep(0.2)
            except KeyboardInterrupt:
                progress.console.print("cancelling (the worker stops at its next step)…")
                self.cancel(record.run_id)
                for event in tail.poll():
                    _render(progress, task, recipe, event)
        self._join_worker(record.run_id, timeout=30.0)  # let the process finish exiting, too
        final = self.get(record.run_id)
        style = {"SUCCEEDED": "green", "FAILED": "red"}.get(final.state, "yellow")
        console.print(f"[{style}]run {final.run_id} {final.state}[/]"
                    + (f": {final.error}" if final.error else "")
                    + (f"; model {final.published_model}" if final.published_model else ""))
        return final

    # -------------------------------------------------------------------------------------- close

    def close(self, *, stop_workers: bool = True, timeout: float | None = None) -> None:
        """Shut down. ``stop_workers`` stops running workers (they stay resumable: recover() picks them
        up); without it the runner only stops watching, leaving workers to the next runner to adopt."""
        if self._detached:
            return  # workers were left to the next runner: not ours to stop any more
        if not stop_workers:
            self._detached = True
            return
        self._closing = True
        with self._lock:
            self._queue.clear()
            workers = list(self._active.values())
            threads = list(self._threads.values())
        for worker in workers:
            run_dir = self.runs_dir / worker.run_id
            if load_run(run_dir).terminal:
                continue  # finished, only exiting: let it
            (run_dir / PREEMPT_MARKER).touch()
            signal_process(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + (self.grace_seconds if timeout is None else timeout)
        for worker in workers:
            while process_alive(worker.pid, worker.start_time) and time.monotonic() < deadline:
                time.sleep(0.05)
            if process_alive(worker.pid, worker.start_time):
                signal_process(worker.pid, signal.SIGKILL, group=True)
        for thread in threads:
            thread.join(timeout=5.0)

    def _join_worker(self, run_id: str, timeout: float) -> None:
        with self._lock:
            thread = self._threads.get(run_id)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def list(self, state: str | None = None) -> list[RunRecord]:
        """Runs of this service, newest first (optionally only those in ``state``)."""
        records = [r for r in self._scan() if state is None or r.state == state]
        records.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        return records


# Metrics the progress bar shows, most telling first: event key → (label, shown as a percentage).
_BAR_METRICS: dict[str, tuple[str, bool]] = {
    "pipeline/der_dev_best": ("best dev DER", True),
    "pipeline/der_dev_trial": ("trial DER", True),
    "eer": ("EER", True),
    "DiarizationErrorRate": ("val DER", True),
    "loss/val": ("val loss", False),
    "loss/train": ("loss", False),
}
# Lines the bridges log once per epoch / evaluation: the bar already shows their numbers, so the
# console skips them (they stay in events.jsonl and worker.log).
_PERIODIC_LINE = re.compile(r"^(epoch|step) \d+: ")
_LOUD_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})


def _render(progress: Any, task: Any, recipe: str, event: dict[str, Any]) -> bool:
    """Show one event in the run's progress bar; True when it ends the run.

    A first ``make demo`` runs two trainings of hundreds of checkpoints and tuning trials on a small
    CPU, and a line for each buried what mattered. So the bar carries the phase ("training epoch
    12/20", then "tuning trial 30/100": each phase its own total, so the ETA is that phase's) and the
    latest key metrics; the console only gets the run's few informative lines and every WARNING or
    ERROR. Checkpoints, per-epoch lines and state changes stay in ``events.jsonl`` (WatchTraining)
    and ``worker.log``; ``run_inline`` prints the outcome. The task's fields keep what it learns
    (``label`` and ``config`` come from ``run_inline``).
    """
    kind = event.get("type")
    if kind == "progress":
        total = int(event.get("total_steps") or 0) or None
        _place(progress, task, int(event.get("step", 0)), total, float(event.get("epoch", 0.0)))
    elif kind == "metrics":
        fields = _fields(progress, task)
        values = {str(k): float(v) for k, v in (event.get("values") or {}).items()}
        latest = {**fields.get("latest", {}), **values}
        progress.update(task, latest=latest, metrics=_metrics_text(latest, values))
    elif kind == "log":
        level = str(event.get("level", "INFO")).upper()
        message = str(event.get("message", ""))
        if level in _LOUD_LEVELS:
            style = "yellow" if level == "WARNING" else "red"
            progress.console.print(f"[{level}] {message}", style=style, markup=False, highlight=False)
        elif not _PERIODIC_LINE.match(message):
            progress.console.print(f"  {message}", style="dim", markup=False, highlight=False)
    elif kind == "state":
        state = event.get("state")
        if state == "SUCCEEDED":  # a full bar, whatever the last throttled progress event said
            shown_total = _fields(progress, task).get("shown_total")
            if shown_total:
                progress.update(task, completed=shown_total)
        return state in TERMINAL_STATES
    return False


def _fields(progress: Any, task: Any) -> dict[str, Any]:
    """The rich task's fields: what ``_render`` remembers between events."""
    return next((t.fields for t in progress.tasks if t.id == task), {})


def _place(progress: Any, task: Any, step: int, total: int | None, epoch: float) -> None:
    """Put the bar where ``step`` of ``total`` is, in the phase that step belongs to.

    A run's step axis can hold two phases (a diarization run: the segmentation fit, then pipeline
    tuning trials counted after it). Progress events carry no phase, so it is worked out here: an
    epoch-based fit (config ``epochs`` without ``max_steps``) has ``step / epoch`` batches per epoch,
    so it ends at ``epochs`` times that, and whatever comes after is tuning. When the phase changes
    the bar restarts, so that the ETA is measured on the new phase's pace, not the old one's.
    """
    fields = _fields(progress, task)
    config = fields.get("config") or {}
    label = fields.get("label", "")
    epochs = 0 if config.get("max_steps") else int(config.get("epochs") or 0)
    per_epoch = int(fields.get("per_epoch") or 0)
    if epochs and not per_epoch and 0 < epoch <= epochs and step > 0:
        per_epoch = max(1, round(step / epoch))
        progress.update(task, per_epoch=per_epoch)
    fit_total = epochs * per_epoch
    latest = fields.get("latest", {})
    if fit_total and step > fit_total:
        phase, done, of = "tuning", step - fit_total, (total - fit_total if total else None)
        where = f"tuning trial {done}/{of}" if of else f"tuning trial {done}"
    elif fit_total:
        phase, done, of = "training", step, fit_total
        where = f"training epoch {max(1, min(epochs, math.ceil(epoch)))}/{epochs}"
    else:
        tuning = any(k.startswith("pipeline/") for k in latest)
        phase, done, of = ("tuning" if tuning else "training"), step, total
        unit = "tuning trial" if tuning else "training step"
        where = f"{unit} {done}/{of}" if of else f"{unit} {done}"
    description = f"{label} {where}".strip()
    if phase != fields.get("phase"):
        kept = {k: v for k, v in latest.items() if k.startswith("pipeline/") == (phase == "tuning")}
        # reset() restarts the ETA's clock and samples, and replaces all fields: pass them all on
        progress.reset(task, total=of, completed=done, description=description,
                       **{**fields, "phase": phase, "latest": kept, "shown_total": of,
                          "metrics": _metrics_text(kept, {})})
    else:
        progress.update(task, total=of, completed=done, description=description, shown_total=of)


def _metrics_text(latest: Mapping[str, float], newest: Mapping[str, float]) -> str:
    """The two most telling of the latest metrics (any two of the newest event's if none is known)."""
    known = [(key, *_BAR_METRICS[key]) for key in _BAR_METRICS if key in latest]
    shown = known[:2] or [(key, key, False) for key in list(newest)[:2]]
    values = {**latest, **newest}
    return "  ".join(f"{label} {100 * values[key]:.1f}%" if percent else f"{label} {values[key]:.4g}"
                     for key, label, percent in shown if math.isfinite(values[key]))


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "process is gone"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {returncode}"


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""

