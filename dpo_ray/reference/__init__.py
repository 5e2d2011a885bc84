"""Reference log-prob sources. The training loop sees only ``ReferenceClient``.

The actor pool (``ReferencePool`` on the driver, ``ActorPoolReference`` on workers) and the precompute
pass (``attach_reference_logps``) import Ray; they load on first use.
"""

from dpo_ray.reference.base import (
    LocalReference,
    NoReference,
    PrecomputedReference,
    ReferenceClient,
    prefetched,
)

_LAZY = {
    "ActorPoolReference": "dpo_ray.reference.client",
    "ReferencePool": "dpo_ray.reference.pool",
    "ReferencePlacementError": "dpo_ray.reference.pool",
    "ReferenceActor": "dpo_ray.reference.actor",
    "ReferenceModelHost": "dpo_ray.reference.actor",
    "attach_reference_logps": "dpo_ray.reference.precompute",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dpo_ray.reference' has no attribute {name!r}")


__all__ = ["LocalReference", "NoReference", "PrecomputedReference", "ReferenceClient", "prefetched", *_LAZY]
