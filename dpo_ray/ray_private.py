"""Every private name of Ray that dpo_ray touches, in one place.

Each function here reaches one private hook of Ray and says what happens when a Ray release renames or removes
it: dpo_ray then falls back to Ray's own behaviour (or to a public API that does the same at some cost), never
to an error. ``ray`` is pinned in pyproject.toml to the minor release the tests ran; tests/test_ray_private.py
checks that every hook below exists there and that every fallback works with the hook taken away, so a Ray
upgrade that breaks one shows as a failing test, not as a silent change in a run.

Hooks (name: what dpo_ray uses it for; what happens without it):

- ``ray._private.worker.print_to_stdstream`` and
  ``ray._private.ray_logging.global_worker_stdstream_dispatcher``: the printer of lines forwarded from
  workers, wrapped by the console filter (cluster.quiet_ray_console); without them everything Ray forwards is
  shown, as in plain Ray.
- ``ray._private.worker._global_node.head``: whether this process started the Ray it is connected to; without
  it dpo_ray assumes a joined cluster (it keeps Ray Train's placement-group cleaner: Ray's default).
- ``ray.train.v2._internal.callbacks.placement_group_callback.PlacementGroupCleanerCallback`` and the
  TorchTrainer methods ``_create_default_callbacks`` / ``_register_sigint_handler``: dropping the cleaner on a
  Ray this process started, and dpo_ray's Ctrl-C; without them Ray's default callbacks and Ctrl-C handling.
- ``ray.data._internal.stats.get_or_create_stats_actor``: Ray Data's stats actor created from the driver (so
  it lives on the head); without it Ray Data creates it where it first needs it, as in plain Ray.
- ``ray._private.state.state.actor_table`` and ``ActorHandle._actor_id``: an actor's state (ALIVE, RESTARTING,
  ...) from the GCS without the dashboard; without them the state is unknown and a reference request is
  bounded by its answer timeout alone (reference.request_timeout_s), not by the capacity timeout for a lost
  node.
- ``Dataset._context`` / ``Dataset._logical_plan.context``: an execution context for one dataset only; without
  them the setting goes on the process's current DataContext (every later dataset of the process gets it).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRAINER_HOOKS = ("_create_default_callbacks", "_register_sigint_handler")

_warned: set[str] = set()


def _missing(hook: str, fallback: str) -> None:
    """Say once per process that a hook is gone and what happens instead."""
    if hook not in _warned:
        _warned.add(hook)
        log.warning("this Ray has no %s: %s (dpo_ray/ray_private.py)", hook, fallback)


def wrap_log_printer(make: Callable[[Callable], Callable]) -> bool:
    """Replace Ray's printer of forwarded worker lines with ``make(original)``; idempotent (a printer marked
    ``dpo_ray_wrapped`` is left alone). False, and Ray's printer unchanged, when the hooks are missing."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        _missing("ray._private.worker / ray_logging", "worker lines are shown unfiltered")
        return False
    show = getattr(ray_worker, "print_to_stdstream", None)
    if show is None:
        _missing("ray._private.worker.print_to_stdstream", "worker lines are shown unfiltered")
        return False
    if getattr(show, "dpo_ray_wrapped", False):
        return True
    wrapped = make(show)
    wrapped.dpo_ray_wrapped = True
    # the raylet's notices (listen_error_messages) look it up per call
    ray_worker.print_to_stdstream = wrapped
    for name, handler in list(getattr(dispatcher, "handlers", ())):  # worker output: a partial bound at init
        if name == "ray_print_logs" and getattr(handler, "func", None) is show:
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, functools.partial(wrapped, **handler.keywords))
    return True


def started_this_ray() -> bool:
    """Whether this process started the Ray it is connected to (a local run, a test's local Ray) rather than
    joining a cluster. False when the hook is missing: a joined cluster is the careful assumption."""
    try:
        import ray._private.worker as worker
    except ImportError:
        _missing("ray._private.worker", "treated as a joined cluster")
        return False
    node = getattr(worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def placement_group_cleaner_callback() -> type | None:
    """Ray Train's PlacementGroupCleanerCallback class, or None when this Ray has none (or names it
    otherwise)."""
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        _missing("PlacementGroupCleanerCallback", "Ray Train keeps its placement-group cleaner")
        return None
    return PlacementGroupCleanerCallback


def trainer_hooks_present(trainer_cls: type) -> bool:
    """Whether the TorchTrainer has the methods dpo_ray overrides (its default callbacks, its SIGINT handler).
    A subclass overriding a method Ray no longer calls changes nothing, so without them Ray's own behaviour
    stays; this says so once."""
    missing = [name for name in TRAINER_HOOKS if not hasattr(trainer_cls, name)]
    if missing:
        _missing(f"TorchTrainer.{'/'.join(missing)}",
                 "Ray Train's default callbacks and Ctrl-C handling apply")
    return not missing


def create_data_stats_actor() -> bool:
    """Create Ray Data's per-cluster stats actor from this process (so it lives on this node). False when the
    hook is missing or creation fails: Ray Data then creates it wherever a dataset first runs, as it does by
    itself."""
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        _missing("ray.data._internal.stats.get_or_create_stats_actor",
                 "Ray Data places its stats actor itself")
        return False
    try:
        get_or_create_stats_actor()
    except Exception as e:  # noqa: BLE001 - Ray Data creates its own later, as in plain Ray
        log.debug("Ray Data's stats actor was not created from the driver: %s", e)
        return False
    return True


class StateUnknown(Exception):
    """The GCS could not be asked (a hiccup while it answers, or a Ray without the hook)."""


def actor_state(handle) -> str:
    """The actor's state as the GCS knows it (ALIVE, RESTARTING, PENDING_CREATION, DEAD, ...), read from the
    GCS actor table, which needs no dashboard. Raises ``StateUnknown`` when it cannot be asked: the caller
    decides what an unknown state means (the reference client lets its answer timeout bound the wait)."""
    try:
        from ray._private.state import state
    except ImportError:
        _missing("ray._private.state", "an actor's state is unknown; only request timeouts bound a wait")
        raise StateUnknown("no GCS actor table in this Ray") from None
    actor_id = getattr(handle, "_actor_id", None)
    if actor_id is None or not hasattr(state, "actor_table"):
        _missing("ActorHandle._actor_id / state.actor_table",
                 "an actor's state is unknown; only request timeouts bound a wait")
        raise StateUnknown("no actor id or actor table in this Ray")
    try:
        info = state.actor_table(actor_id.hex())
    except Exception as e:  # noqa: BLE001 - a GCS hiccup (during a head's restart, a lost connection)
        raise StateUnknown(f"the GCS did not answer: {type(e).__name__}: {e}") from None
    if not info or "State" not in info:
        raise StateUnknown("the GCS does not know this actor")
    return info["State"]


def set_dataset_context(ds, ctx) -> None:
    """Give dataset ``ds`` its own execution context ``ctx`` (block order, block size): Ray's public setter,
    ``DataContext._set_current``, would change every dataset of the process. Without the private attributes
    the settings go on the process's current context (the same order for every later dataset: slower, still
    correct)."""
    plan = getattr(ds, "_logical_plan", None)
    if plan is None or not hasattr(ds, "_context") or not hasattr(plan, "context"):
        from ray.data import DataContext

        _missing("Dataset._context / _logical_plan",
                 "the execution settings apply to every dataset of the process")
        current = DataContext.get_current()
        current.execution_options.preserve_order = ctx.execution_options.preserve_order
        current.target_max_block_size = ctx.target_max_block_size
        return
    ds._context = ctx
    plan.context = ctx
