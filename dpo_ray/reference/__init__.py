"""Reference log-prob sources. The training loop sees only ``ReferenceClient``."""

from dpo_ray.reference.base import (
    LocalReference,
    NoReference,
    PrecomputedReference,
    ReferenceClient,
    prefetched,
)

__all__ = ["LocalReference", "NoReference", "PrecomputedReference", "ReferenceClient", "prefetched"]
