"""Driver side: joining or starting Ray, and what every worker process gets (resources, environment).

Used by the trainer, the reference pool and `dpo-ray inspect-data`: none of them starts Ray another way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys

from dpo_ray import ray_private
from dpo_ray.config import DPOConfig
from dpo_ray.errors import ConfigError
from dpo_ray.paths import local_inputs

WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # "Writing model shards" bars from every save_pretrained
}

# Lines Ray and the libraries forward from worker processes that a person running training does not act on.
# The console keeps the run header, progress, metrics and every error; these stay in Ray's log files
# (<ray temp dir>/session_latest/logs/) and show with DPO_RAY_RAY_LOGS=all. Errors are never filtered.
RAY_NOISE = re.compile("|".join((
    # Ray Train's PlacementGroupCleaner polls a dashboard we skip
    r"State API may be temporarily unavailable",
    r"Requesting resources: |Attempting to start training worker group|Started training worker group",
    r"^- \(ip=\S+, pid=\d+\) world_rank=",
    r"Setting up process group for",
    r"Checkpoint successfully created at|Reporting training result \d+",
    r"deepspeed_shm_comm_op built successfully",
    r"Progress bars disabled\. To enable",
    r"Dataset \S+ execution finished in|Registered dataset logger|Starting execution of Dataset|"
    r"Execution plan of",
    r"Full stats for this dataset|Tip: For detailed progress reporting",
    r"PYTHON worker processes have been started on node",  # the raylet, at start-up on small machines
    r"Warning|warnings\.warn\(",  # library deprecation / advisory warnings (and the source line after them)
)))
ERROR_WORDS = re.compile(r"Error|Exception|Traceback|error:|failed|Failed")


def _is_noise(line: str) -> bool:
    return bool(RAY_NOISE.search(line)) and not (ERROR_WORDS.search(line) and "State API" not in line)


def _keep(lines: list[str]) -> list[str]:
    kept, dropped_warning = [], False
    for line in lines:
        if dropped_warning and line[:1].isspace():  # the source line Python prints under a warning
            continue
        noise = _is_noise(line)
        dropped_warning = noise and "Warning" in line
        if not noise:
            kept.append(line)
    return kept


class _CleanerTraceback:
    """Ray Train's PlacementGroupCleaner (a detached actor per run) asks the state API whether the run's
    controller lives. With a second Ray instance on the machine (two runs at once, a test suite beside a run)
    that call finds two clusters, raises ConnectionError and its monitor thread dies with a ~30-line
    traceback, forwarded to every run's console. The run goes on (on a local Ray the check never succeeds
    anyway: the state API needs the dashboard, which a local run does not start). Its lines are replaced by
    one line naming the error; the traceback stays in the actor's log file. Other actors' lines and the
    cleaner's other lines pass."""

    START = "Exception in thread PlacementGroupCleanerMonitor"

    def __init__(self) -> None:
        self.inside: set[int] = set()

    def __call__(self, data: dict) -> list[str]:
        lines = list(data.get("lines", []))
        if data.get("actor_name") != "PlacementGroupCleaner":
            return lines
        pid, kept = data.get("pid"), []
        for line in lines:
            if line.startswith(self.START):
                self.inside.add(pid)
            elif pid in self.inside and not line[:1].isspace() and not line.startswith("Traceback"):
                self.inside.discard(pid)  # the exception line ends the traceback
                kept.append(f"Ray Train's placement-group cleaner stopped ({line.strip()[:160]}); the run "
                            "goes on, the traceback is in Ray's log files")
            elif pid not in self.inside:
                kept.append(line)
        return kept


def quiet_ray_console() -> None:
    """Filter what Ray prints on this driver's console from other processes (see ``RAY_NOISE``): worker and
    actor output, and the raylet's notices. Idempotent. Wraps Ray's printer (a private hook, which both
    paths use: ray_private.wrap_log_printer); if that changes, everything is shown as before.

    Output that is not a terminal (a pipe, a file, ``ray job logs``) gets Ray's ``(RayTrainWorker pid=...)``
    prefixes without colour codes (Ray's RAY_COLOR_PREFIX=0, read per line; set it yourself to choose). In a
    terminal each forwarded line clears the driver's bar first and redraws it after, so a worker's line never
    lands on the bar."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if os.environ.get("DPO_RAY_RAY_LOGS", "quiet") == "all":
        return

    def make(show):
        cleaner = _CleanerTraceback()

        def quiet(data: dict, ignore_prefix: bool = False) -> None:
            kept = _keep(cleaner(data))
            if kept:
                with _bars_cleared():
                    show({**data, "lines": kept}, ignore_prefix)

        return quiet

    ray_private.wrap_log_printer(make)


def _bars_cleared():
    """tqdm's own context: every live bar on stdout/stderr is cleared, then redrawn (the driver's bar, if
    any)."""
    import contextlib

    tqdm = sys.modules.get("tqdm")
    if tqdm is None or not hasattr(tqdm, "tqdm"):
        return contextlib.nullcontext()
    return tqdm.tqdm.external_write_mode()


class _DriverNoise(logging.Filter):
    """Ray's driver-side notices at every local start ("Started a local Ray instance", the token-auth
    advice) and Ray Data's in this process (progress bars disabled, "execution finished": ``RAY_NOISE``; they
    stay in Ray Data's log file); warnings and errors otherwise pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Started a local Ray instance")
                    or "Token authentication is enabled" in message
                    or (record.levelno < logging.ERROR and _is_noise(message)))


def quiet_ray_driver_logs() -> None:
    """The filter on the console handlers of Ray's and Ray Data's loggers in this process (idempotent)."""
    if os.environ.get("DPO_RAY_RAY_LOGS", "quiet") == "all":
        return
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DriverNoise) for f in handler.filters):
                handler.addFilter(_DriverNoise())


def init_ray(cfg: DPOConfig) -> None:
    """Join ``ray.address`` / RAY_ADDRESS when given; otherwise start an in-process local Ray.

    A local Ray gets more logical CPUs than cores (2× cores, at least 8): workers, reference actors and
    Ray Data tasks request fractions, and on a 2-core box exact accounting starves Ray Data: the run hangs
    with "cluster resources are not enough to run any task".
    """
    import ray
    import ray.data

    # Ray Train's controller checks on the worker group every 2 s by default, so each run's start and end
    # wait up to that long; a 0.5 s check costs nothing and matters for short runs (propagated by Ray Train
    # from this process's environment; set it yourself to override).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Ray Train routes a worker's print() into its logger and, since Ray's worker stdout is not
    # sys.__stdout__, also prints it: every print in a callback or a user's model code reached the console
    # twice (measured with the docs/training.md callback example). Off, a print is one line, as in a plain
    # script.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Data's per-operator progress bars drown the metrics table in a terminal; the table is the UI.
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = os.environ.get("DPO_RAY_DATA_PROGRESS", "0") == "1"
    data_ctx.print_on_execution_start = False
    quiet_ray_driver_logs()
    if ray.is_initialized():
        quiet_ray_console()
        pin_ray_data_stats_to_driver()
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {**WORKER_ENV, **joined_cluster_env(address), **cfg.ray.runtime_env.get("env_vars", {})}
    runtime_env = {**cfg.ray.runtime_env, "env_vars": env}
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        # Under `ray job submit` Ray merges the job's runtime_env with ours and refuses any key set twice:
        # the job's settings win, ours fill only what it leaves open.
        job_env = (json.loads(job_config).get("runtime_env") or {})
        job_vars = job_env.get("env_vars") or {}
        runtime_env = {k: v for k, v in runtime_env.items() if k not in job_env or k == "env_vars"}
        runtime_env["env_vars"] = {k: v for k, v in env.items() if k not in job_vars}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # One machine: no node is preempted, and Ray Train's PreemptionWatcher actor only costs a process
        # (and logs a core_worker error at every start). Set the variable yourself to keep it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        cpus = cfg.ray.num_cpus or max(8, 2 * (os.cpu_count() or 1))
        # "local": a new Ray of its own, even when a `ray start` head runs on this machine (without it
        # ray.init would join that one and refuse num_cpus); join a cluster with ray.address / RAY_ADDRESS
        # instead.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=True)
    quiet_ray_console()
    pin_ray_data_stats_to_driver()


def joined_cluster_env(address: str | None) -> dict[str, str]:
    """RAY_ADDRESS for the run's actors when it joins a cluster at a concrete ``host:port`` (``ray job
    submit`` sets one). Ray Train's placement-group cleaner (a detached actor per run on a joined cluster)
    asks the state API whether the run's controller lives; without an address that call looks for Ray
    instances on its machine, and with a second one there (another user's local run, a test suite) it
    raises "Found multiple active Ray instances", its monitor thread dies and the actor stays alive after the
    run, holding its memory until the cluster stops. With the address it finds its own cluster. "auto", Ray
    Client URLs and a variable already set are left as they are."""
    if not address or "://" in address or address in ("auto", "local") or ":" not in address:
        return {}
    return {"RAY_ADDRESS": address}


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (a local run, or a test's local Ray), rather
    than joining a cluster (ray.address / RAY_ADDRESS, `ray job submit`)."""
    return ray_private.started_this_ray()


def torch_trainer_class():
    """Ray Train's TorchTrainer with dpo_ray's Ctrl-C, and on a Ray this process started, without Ray Train's
    placement-group cleaner.

    Ctrl-C: Ray's handler logs "Received SIGINT. Gracefully aborting" and leaves the command to exit 1 with no
    report; ours aborts the run the same way (the controller stops the workers) without a word and sets
    ``interrupted`` on the trainer, so the driver writes report.json and says what was saved
    (``DPOTrainer.train``). A second Ctrl-C raises KeyboardInterrupt at once.

    The cleaner is a detached actor that removes the run's placement group if the Train controller dies while
    the cluster lives on. A Ray started by this process ends with it, placement groups included, so there it
    is only one more process to start with every run (~117 MiB, a torch-free Ray import) and a poller of a
    state API this Ray serves without a dashboard. Joined clusters keep it. Both are Ray's private hooks
    (ray_private): when Ray renames them, Ray's own behaviour stays."""
    from ray.train.torch import TorchTrainer

    cleaner = None
    if ray_private.trainer_hooks_present(TorchTrainer) and started_here():
        cleaner = ray_private.placement_group_cleaner_callback()
    drop_cleaner = cleaner is not None

    class DpoRayTorchTrainer(TorchTrainer):
        interrupted = False

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if not isinstance(c, cleaner)] if drop_cleaner else callbacks

        def _register_sigint_handler(self, controller):
            import signal

            import ray

            def on_sigint(signum, frame):
                if self.interrupted:  # the second Ctrl-C: no more waiting
                    raise KeyboardInterrupt
                self.interrupted = True
                try:
                    ray.get(controller.abort.remote())
                except Exception:  # noqa: BLE001 - the controller is already gone: fit() returns by itself
                    pass

            signal.signal(signal.SIGINT, on_sigint)

    return DpoRayTorchTrainer


def pin_ray_data_stats_to_driver() -> None:
    """Ray Data keeps one detached stats actor per cluster, pinned to the node of whichever process first runs
    a dataset: in a training run that is the split coordinator or a read task on a worker node, and when that
    node is lost every later Ray Data run on the cluster fails ("_StatsActor ... its node has died"). Created
    here, from the driver, it lives on the driver's node (the head on a cluster). Best effort (a private Ray
    Data hook: ray_private.create_data_stats_actor)."""
    ray_private.create_data_stats_actor()


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def worker_resources(cfg: DPOConfig, use_gpu: bool) -> dict[str, float]:
    if cfg.ray.resources_per_worker:
        return dict(cfg.ray.resources_per_worker)
    return {"CPU": 2, "GPU": 1} if use_gpu else {"CPU": 0.5}


def worker_env(use_gpu: bool) -> dict[str, str]:
    # every setting a worker needs travels in the config; no DPO_RAY_* variable is read there
    env = dict(WORKER_ENV)
    # DeepSpeed picks its accelerator from DS_ACCELERATOR; a driver started with it set to cpu (the Makefile
    # exports that for CPU machines) must not put GPU workers on DeepSpeed's CPU accelerator.
    env["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    return env


def _probe(paths: dict[str, str], marker: str | None) -> dict[str, bool]:
    """On one node: which of ``paths`` (globs allowed) exist, and whether the driver's marker file is
    visible."""
    import glob as glob_

    seen = {key: bool(glob_.glob(p)) or os.path.exists(p) for key, p in paths.items()}
    if marker is not None:
        seen["output_dir"] = os.path.exists(marker)
    return seen


def paths_missing_on_nodes(paths: dict[str, str], output_dir: str | None = None,
                           timeout_s: float = 120.0) -> list[tuple[str, str]]:
    """(key, message) for each local path some alive node of the cluster cannot see.

    Runs a zero-CPU probe task pinned to every alive node. ``output_dir``: the driver writes a marker file
    there first, so a directory that exists on every node but is not *shared* (each node its own disk) is
    caught too: rank 0 and the checkpoints may land on another node than the driver. One node: nothing to
    check.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2 or not (paths or output_dir):
        return []
    marker = None
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        marker = os.path.join(output_dir, f".dpo_ray_node_check_{uuid.uuid4().hex}")
        open(marker, "w").close()
    probe = ray.remote(num_cpus=0)(_probe)
    try:
        refs = {n["NodeID"]: probe.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(paths, marker) for n in nodes}
        results = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    finally:
        if marker is not None:
            from dpo_ray.owned import check_inside

            os.unlink(check_inside(marker, output_dir))  # the probe file made above, inside output_dir
    where = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
    problems = []
    for key in [*paths, *(["output_dir"] if marker else [])]:
        blind = [f"{node[:8]} ({where[node]})" for node, seen in results.items() if not seen[key]]
        if blind:
            value = output_dir if key == "output_dir" else paths[key]
            what = "is not shared with" if key == "output_dir" else "does not exist on"
            problems.append((key, f"{value} {what} node(s) {', '.join(blind)}: workers, reference actors and "
                                  "data tasks run on every node. Put it on storage every node mounts (NFS, a "
                                  "Kubernetes PVC: deploy/pvc.yaml) and give that path"))
    return problems


def check_nodes_see_paths(cfg: DPOConfig) -> None:
    """On a multi-node cluster, fail before training when a local input or output_dir is not on every node."""
    problems = paths_missing_on_nodes(local_inputs(cfg), cfg.output_dir)
    if problems:
        raise ConfigError(problems)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class TrainingProgress:
    """The driver's live view of a training run: polls the board twice a second and draws ``Progress``
    (dpo_ray.progress: a bar in a terminal, a line every few seconds elsewhere); after the first steps it
    prints the estimated duration once."""

    POLL_S = 0.5
    ESTIMATE_AFTER = 3  # optimizer steps

    def __init__(self, mode: str, total_steps: int, pairs_per_step: int):
        import threading

        from dpo_ray.ledger import ProgressBoard, on_driver_node
        from dpo_ray.progress import Progress

        # on the driver's node (the head): losing a worker node must not take the display's state with it
        self.board = ProgressBoard.options(scheduling_strategy=on_driver_node()).remote()
        self.marks: dict[str, float] = {}  # rank 0's start-up marks, read when the run ends
        self.total, self.pairs_per_step = total_steps, pairs_per_step
        self.desc = f"dpo-ray {mode}"
        self.display: Progress | None = None
        self.step: int | None = None  # the last optimizer step the board showed
        self.final: dict[str, float] = {}  # the whole run's rates as of the last logged step (Throughput)
        self._make = lambda initial: Progress(self.desc, total_steps, "steps", initial=initial, own_rate=True)
        self._estimated = False
        # in a terminal, the start-up status line until the first step (``_show_startup``)
        self._startup = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dpo-ray-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self.poll()

    def poll(self) -> None:
        import ray

        try:
            state = ray.get(self.board.read.remote(), timeout=10)
        except Exception:  # the board is gone (shutdown) or slow: the display is best effort
            return
        step = state.pop("step")
        if step is None:
            self._show_startup()
            return
        self.step = step
        first_step = state["first"][0]  # the loop's start (or resume)
        if self.display is None:
            self._end_startup()
            self.display = self._make(first_step)
        # every number is rank 0's (dpo_ray.train.logger.Throughput): the same as report.json and the summary
        steps_done, train_s = state.get("steps_done") or 0, state.get("train_runtime_s") or 0.0
        per_step = train_s / steps_done if steps_done and train_s > 0 else None
        self.display.update(step, seconds_per_unit=per_step, epoch=state.get("epoch"),
                            pairs_per_s=_round(state.get("pairs_per_s")),
                            tokens_per_s=_round(state.get("tokens_per_s")), loss=state.get("loss"))
        if "counted_s" in state:  # as of the last logged step: time, counts and rates of one instant
            # microseconds: a run of a few fast steps (0.3 s) must still give
            # pairs / train_runtime_s = pairs_per_s
            self.final = {"train_runtime_s": round(state["counted_s"], 6), "pairs": state["pairs"],
                          "tokens": state["tokens"], "pairs_per_s": round(state["pairs_per_s"], 4),
                          "tokens_per_s": round(state["tokens_per_s"], 4)}
        if not self._estimated and per_step and steps_done >= self.ESTIMATE_AFTER:
            from dpo_ray.progress import fmt_duration

            self._estimated = True
            with _bars_cleared():
                print(f"{self.desc}: estimated duration {fmt_duration(per_step * (self.total - first_step))} "
                      f"({per_step:.2f} s/step over the first {steps_done} steps)", file=sys.stderr,
                      flush=True)

    # rank 0's start-up marks (dpo_ray.timeline) -> what it is doing now
    NEXT_STAGE = {None: "the worker group", "worker": "loading the policy", "policy": "the DeepSpeed engine",
                  "engine": "the first batch (Ray Data)", "first batch": "the first optimizer step"}

    def _show_startup(self) -> None:
        """In a terminal, from the plan to the first step: one live status line, stage by stage (the worker
        group, the policy, the engine, the first batch), replaced by the step bar; off a terminal nothing (the
        summary's start-up line says where the time went)."""
        import ray

        from dpo_ray.progress import bar_width, choose_form

        if choose_form(sys.stderr) != "bar":
            return
        try:
            marks = ray.get(self.board.marks.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - best effort
            return
        last = max(marks, key=marks.get) if marks else None
        doing = self.NEXT_STAGE.get(last, "the first optimizer step")
        if self._startup is None:
            from tqdm import tqdm

            self._startup = tqdm(total=None, file=sys.stderr, bar_format="{desc} [{elapsed}]", leave=False,
                                 **bar_width(sys.stderr))
        self._startup.set_description_str(f"{self.desc}: starting: {doing}", refresh=True)

    def _end_startup(self) -> None:
        if self._startup is not None:
            self._startup.close()
            self._startup = None

    def close(self) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()
        self._end_startup()
        if self.display is not None:
            self.display.close()
        try:
            self.marks = ray.get(self.board.marks.remote(), timeout=10)
        except Exception:  # the board is gone: the timeline has the driver's marks only
            pass
        try:
            ray.kill(self.board)
        except Exception:  # already gone
            pass
