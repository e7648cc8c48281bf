"""Fine-tuning jobs: an OpenAI-shaped queue in front of training worker processes.

At most `max_running` jobs train at once (1 by default); the rest wait, queued, oldest
first. Each one trains in a worker process started with the "spawn" context
(adapters.finetune_worker), so the engine's loop never waits on training. On success
the adapter is validated and registered in the tenant's namespace as `fine_tuned_model`
(and as `suffix`, a second name for the same files): the next request can use it.

    <root>/jobs/<tenant>/<job id>.json   the job object, its training settings and events
    <root>/work/<job id>/                a running job's output; removed when the job ends
<root> is --finetune-dir, by default `finetune/` inside the adapter store's root (the
store reads only its own folders there), so files and jobs go with the adapters they make.

Like every "spawn" user, a script that builds the app itself must start it under
`if __name__ == "__main__":`, or each worker re-runs the script (`loraserve serve` is safe).

Only a job's final state survives a restart: a job that was queued or running when its
server stopped is marked failed, with an error saying so, when the next server starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import queue
import threading
import time
import uuid
from collections import deque

from .durable import fsync_dir, write_file_atomic
from .errors import AdapterError
from .files import FileNotFound, FileStore
from .finetune_job import ACTIVE, Job, JobNotCancellable, JobNotFound, model_name, stopped_error
from .finetune_worker import WorkerJob, run as run_worker
from .store_layout import remove_path

log = logging.getLogger(__name__)

MAX_EVENTS = 2000           # a job keeps its newest events; a step makes one


class JobManager:
    def __init__(self, root: str, files: FileStore, store, base_dir: str, base_model_id: str,
                 max_running: int = 1, num_threads: int = 1):
        self.files = files
        self.store = store
        self.base_dir = base_dir
        self.base_model_id = base_model_id
        self.max_running = max_running
        self.num_threads = num_threads
        self.jobs_dir = os.path.join(root, "jobs")
        self.work_dir = os.path.join(root, "work")
        self.tmp = os.path.join(root, "tmp")
        for path in (self.jobs_dir, self.tmp):
            os.makedirs(path, exist_ok=True)
        for entry in os.listdir(self.tmp):   # what interrupted writes left; none of it was ever visible
            remove_path(os.path.join(self.tmp, entry))
        remove_path(self.work_dir)          # what killed workers left; nothing there was ever served
        os.makedirs(self.work_dir)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}     # creation order
        self._queue: deque[str] = deque()
        self._processes: dict[str, multiprocessing.process.BaseProcess] = {}
        self._finalizing: set[str] = set()  # trained, being registered: too late to cancel
        self._closed = False
        self._recover()

    # -- the API ---------------------------------------------------------------------------
    def create(self, tenant: str, model: str, training_file: str, validation_file: str | None, suffix: str | None,
               seed: int, hyperparameters: dict, config: dict, metadata: dict | None = None) -> Job:
        job = Job(id=f"ftjob-{uuid.uuid4().hex[:24]}", tenant=tenant, model=model, training_file=training_file,
                  validation_file=validation_file, suffix=suffix, seed=seed, hyperparameters=hyperparameters,
                  config=config, created_at=int(time.time()), metadata=metadata)
        with self._lock:
            self._add_event(job, f"Created fine-tuning job {job.id} on {training_file}")
            self._jobs[job.id] = job
            self._queue.append(job.id)
            self._persist(job)
            self._start_queued()
        return job

    def get(self, tenant: str, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.tenant != tenant:   # the same answer for another tenant's job: no probing
            raise JobNotFound(f"no fine-tuning job {job_id!r} for this tenant; GET /v1/fine_tuning/jobs lists yours",
                              "fine_tuning_job_id")
        return job

    def list(self, tenant: str) -> list[Job]:
        """Newest first."""
        with self._lock:
            return [j for j in reversed(self._jobs.values()) if j.tenant == tenant]

    def events(self, tenant: str, job_id: str) -> list[dict]:
        """Newest first, as OpenAI lists them."""
        job = self.get(tenant, job_id)
        with self._lock:
            return list(reversed(job.events))

    def cancel(self, tenant: str, job_id: str) -> Job:
        job = self.get(tenant, job_id)
        with self._lock:
            if job.status not in ACTIVE or job.id in self._finalizing:
                state = job.status if job.status not in ACTIVE else "finished training and is being registered"
                raise JobNotCancellable(f"fine-tuning job {job_id} has already {state}; only a queued or running "
                                        "job can be cancelled", "fine_tuning_job_id")
            if job.id in self._queue:
                self._queue.remove(job.id)
            process = self._processes.get(job.id)
            self._end(job, "cancelled", "Job cancelled by the user")
        if process is not None:
            process.terminate()             # the supervisor sees it exit and cleans up
        return job

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every worker; their jobs are marked failed, as a restart would mark them."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                if job.status in ACTIVE:
                    self._end(job, "failed", "The server stopped", error=stopped_error(job.status))
            processes = list(self._processes.values())
            self._queue.clear()
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()

    # -- running jobs ----------------------------------------------------------------------
    def _start_queued(self) -> None:
        """Under the lock: start the oldest queued jobs while there is room."""
        running = sum(j.status == "running" for j in self._jobs.values())
        while self._queue and running < self.max_running and not self._closed:
            job = self._jobs[self._queue.popleft()]
            job.status = "running"
            self._add_event(job, "Fine-tuning job started")
            self._persist(job)
            running += 1
            threading.Thread(target=self._supervise, args=(job,), name=f"finetune-{job.id}", daemon=True).start()

    def _supervise(self, job: Job) -> None:
        out_dir = os.path.join(self.work_dir, job.id)
        context = multiprocessing.get_context("spawn")
        events = context.Queue()
        process = None
        try:
            worker_job = self._worker_job(job, out_dir)
            process = context.Process(target=run_worker, args=(worker_job, events), name=f"finetune-{job.id}",
                                      daemon=True)
            with self._lock:
                if job.status != "running":
                    return                  # cancelled before it could start
                process.start()
                self._processes[job.id] = process
            outcome = self._pump(job, process, events)
            self._finish(job, outcome, out_dir)
        except FileNotFound as e:           # a file deleted since the job was created
            self._fail(job, "file_not_found", f"{e.message} (it was deleted before the job started)", e.param)
        except Exception as e:              # noqa: BLE001 - a job must end, whatever broke
            log.exception("fine-tuning job %s failed", job.id)
            self._fail(job, "internal_error", f"{type(e).__name__}: {e}", None)
        finally:
            if process is not None and process.pid is not None:
                process.join(5)
                if process.is_alive():
                    process.kill()
                    process.join(5)
            events.close()
            remove_path(out_dir)
            with self._lock:
                self._processes.pop(job.id, None)
                self._finalizing.discard(job.id)
                self._start_queued()

    def _fail(self, job: Job, code: str, message: str, param: str | None) -> None:
        with self._lock:
            if job.status == "running":
                self._end(job, "failed", f"Job failed: {message}", error={"code": code, "message": message,
                                                                          "param": param})

    def _worker_job(self, job: Job, out_dir: str) -> WorkerJob:
        training = self.files.get(job.tenant, job.training_file, "training_file")
        validation = self.files.get(job.tenant, job.validation_file, "validation_file") if job.validation_file else None
        return WorkerJob(base_dir=self.base_dir, base_model_id=self.base_model_id,
                         training_path=self.files.data_path(training),
                         validation_path=self.files.data_path(validation) if validation else None,
                         out_dir=out_dir, config=job.config, num_threads=self.num_threads, parent_pid=os.getpid())

    def _pump(self, job: Job, process, events) -> tuple:
        """Relay progress until the worker reports its end (or dies); return the last message."""
        while True:
            try:
                message = events.get(timeout=0.5)
            except queue.Empty:
                if process.is_alive():
                    continue
                try:
                    message = events.get(timeout=1.0)   # anything it sent just before it exited
                except queue.Empty:
                    return ("error", "worker_died", f"the training process exited (code {process.exitcode}) "
                                                    "before it finished; see the server log")
            if message[0] != "progress":
                return message
            self._progress(job, message[1])

    def _progress(self, job: Job, p: dict) -> None:
        with self._lock:
            if job.status != "running":
                return
            if p["eta_s"] is not None:
                job.estimated_finish = int(time.time() + p["eta_s"])
            data = {"step": p["step"], "total_steps": p["total_steps"], "epoch": round(p["epoch"], 3),
                    "trained_tokens": p["tokens"], "tokens_per_second": round(p["tokens_per_s"], 1)}
            if p["train_loss"] is not None:
                data["train_loss"] = p["train_loss"]
                text = f"Step {p['step']}/{p['total_steps']}: training loss={p['train_loss']:.4f}"
            else:
                data["valid_loss"] = p["eval_loss"]
                text = f"Epoch {round(p['epoch'])}: eval loss={p['eval_loss']:.4f} (held-out examples)"
            self._add_event(job, text, data=data, kind="metrics")

    def _finish(self, job: Job, outcome: tuple, out_dir: str) -> None:
        with self._lock:
            if job.status != "running":
                return                      # cancelled meanwhile
            if outcome[0] != "done":
                _, code, message = outcome
                param = "training_file" if code in ("invalid_training_file", "file_not_found") else None
                self._end(job, "failed", f"Job failed: {message}", error={"code": code, "message": message,
                                                                          "param": param})
                return
            self._finalizing.add(job.id)
            result = outcome[1]
            summary = (f"Training finished in {result['seconds']:.0f} s: {result['steps']} steps on "
                       f"{result['num_train']} examples, {result['trained_tokens']} tokens, "
                       f"mean training loss {result['train_loss']:.4f}")
            if result["eval_loss"] is not None:
                summary += f", eval loss {result['eval_loss']:.4f} on {result['num_eval']} held-out examples"
            self._add_event(job, summary)
        try:
            record = self.store.register_dir(job.tenant, model_name(job), out_dir)
            alias = self.store.register_dir(job.tenant, job.suffix, out_dir) if job.suffix else None
        except (AdapterError, OSError) as e:
            self._fail(job, "invalid_adapter", f"the trained adapter was rejected: {e}", None)
            return
        with self._lock:
            self._add_event(job, f"New fine-tuned model created: {record.name}")
            if alias is not None:
                self._add_event(job, f"Also registered as {alias.name} (version {alias.version})")
            job.fine_tuned_model = record.name
            job.trained_tokens = int(result["trained_tokens"])
            self._end(job, "succeeded", "The job has successfully completed")

    # -- state -----------------------------------------------------------------------------
    def _end(self, job: Job, status: str, message: str, error: dict | None = None) -> None:
        """Under the lock: a job's last state, persisted."""
        job.status = status
        job.finished_at = int(time.time())
        job.estimated_finish = None
        job.error = error
        self._add_event(job, message, level="error" if status == "failed" else "info")
        self._persist(job)

    def _add_event(self, job: Job, message: str, level: str = "info", data: dict | None = None,
                   kind: str = "message") -> None:
        job.events.append({"object": "fine_tuning.job.event", "id": f"ftevent-{uuid.uuid4().hex[:24]}",
                           "created_at": int(time.time()), "level": level, "message": message,
                           "data": data or {}, "type": kind})
        del job.events[:-MAX_EVENTS]

    def _persist(self, job: Job) -> None:
        folder = os.path.join(self.jobs_dir, job.tenant)
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
            fsync_dir(self.jobs_dir)
        write_file_atomic(os.path.join(folder, f"{job.id}.json"), json.dumps(dataclasses.asdict(job)).encode(),
                          self.tmp)

    def _recover(self) -> None:
        jobs = []
        for tenant in sorted(os.listdir(self.jobs_dir)):
            for name in os.listdir(os.path.join(self.jobs_dir, tenant)):
                if name.endswith(".json"):
                    with open(os.path.join(self.jobs_dir, tenant, name), "rb") as f:
                        jobs.append(Job(**json.loads(f.read())))
        for job in sorted(jobs, key=lambda j: (j.created_at, j.id)):
            self._jobs[job.id] = job
            if job.status in ACTIVE:
                self._end(job, "failed", "The server restarted", error=stopped_error(job.status))
