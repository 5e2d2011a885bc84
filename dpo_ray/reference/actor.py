"""The frozen reference model served from its own process: ``ReferenceActor`` (a Ray actor).

``ReferenceModelHost`` holds the logic and runs in-process too (tests, the precompute pass);
``ReferenceActor`` is the same class as a Ray actor. Everything crossing the process boundary is on
CPU: the client sends ``input_ids`` / ``attention_mask`` / ``completion_mask`` (plus the pixel inputs of
vision batches, ``request_keys``) and gets back
(request_id, weights_version, ref_chosen (B,), ref_rejected (B,)) as float32.

Weights version: 0 is the loaded model; every TR-DPO mix (``mix``) moves it to the version the client
names. The version travels with every result, so a client can tell an answer computed before a sync,
or by an actor that restarted and reloaded version 0, from a current one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import ray
import torch
from torch import Tensor, nn

from dpo_ray.config import DPOConfig
from dpo_ray.forward import GROUP_KEYS, reference_logps
from dpo_ray.models import load_causal_lm, reference_dtype
from dpo_ray.reference.base import mix_tensor, param_name, params_by_name
from dpo_ray.sharing import PrefixSharing
from dpo_ray.vision import PIXEL_KEYS

REQUEST_KEYS = ("input_ids", "attention_mask", "completion_mask")
OPTIONAL_REQUEST_KEYS = ("packed_width",)  # a Python int from the collate (prefix sharing's shapes)


def request_keys(batch: Mapping[str, Tensor]) -> tuple[str, ...]:
    """What a reference request carries: the text tensors, and the pixel inputs when the batch has images."""
    # groups: their pair index travels too
    return REQUEST_KEYS + tuple(k for k in (*PIXEL_KEYS, *OPTIONAL_REQUEST_KEYS, *GROUP_KEYS) if k in batch)


def to_wire(value):
    """A request/answer field as Ray ships it cheaply: numpy (zero-copy out of the object store), not a
    pickled torch tensor; dtypes numpy lacks (bfloat16 pixels) and plain Python values travel as they are."""
    if torch.is_tensor(value) and value.dtype != torch.bfloat16:
        return value.detach().cpu().numpy()
    return value.detach().cpu() if torch.is_tensor(value) else value


def from_wire(value, device: torch.device | None = None):
    """The inverse of ``to_wire``: numpy -> tensor (on ``device``; pinned for an asynchronous copy to a
    GPU)."""
    if not isinstance(value, np.ndarray):
        return value.to(device, non_blocking=True) if torch.is_tensor(value) and device is not None else value
    # object-store views are read-only
    t = torch.from_numpy(np.array(value) if not value.flags.writeable else value)
    if device is not None and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device) if device is not None else t


def reference_device(num_gpus: float) -> torch.device:
    """cuda when the actor was given a GPU (Ray sets CUDA_VISIBLE_DEVICES for it), else cpu."""
    if num_gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"reference.num_gpus={num_gpus} but the reference actor sees no CUDA device; check the "
                "node's drivers or set reference.num_gpus: 0 to run the reference on CPU")
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_threads(num_cpus: float) -> int:
    """Intra-op threads for a CPU actor: its CPU share rounded, 1..2 (more oversubscribes small boxes)."""
    return max(1, min(2, int(num_cpus)))


class FromRequests:
    """The source of a reference actor that loads its model from its requests (``ReferencePool``).

    Ray logs an error-level line for every restartable actor whose constructor arguments hold an ObjectRef
    (ray-project/ray#53727), and a model or a large tokenizer is one. So the pool's actors start empty and
    every request carries ``model``: a one-element list holding the ObjectRef of ``{"source", "tokenizer"}``
    (nested, so Ray does not resolve it per call). The first request loads it, and so does the first one a
    restarted actor receives (Ray retries the request that was in flight, which brings the reference
    along)."""


class ReferenceModelHost:
    """A frozen causal LM answering log-prob requests; the body of ``ReferenceActor``.

    ``source``: a model directory, a ``{"config", "state_dict"}`` dict (an ObjectRef passed to a Ray
    actor arrives resolved), None for the tiny default seeded by ``cfg.seed``, or ``FromRequests()``: the
    model comes with the first request's ``model`` argument.
    """

    def __init__(self, cfg: DPOConfig | dict, source: str | dict | FromRequests | None, tokenizer):
        self.cfg = cfg if isinstance(cfg, DPOConfig) else DPOConfig(**cfg)
        rc = self.cfg.reference
        self.device = reference_device(rc.num_gpus)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(rc.num_cpus))
        self.dtype = reference_dtype(self.cfg, self.device)
        self.model: nn.Module | None = None
        self.version = 0
        self.forwards = 0
        self.sharing = PrefixSharing(self.cfg.prefix_sharing, "reference", self.cfg.prefix_attention)
        if not isinstance(source, FromRequests):
            self._load(source, tokenizer)

    def _load(self, source, tokenizer) -> None:
        if isinstance(source, ray.ObjectRef):  # nested refs are not resolved by Ray; top-level ones are
            source = ray.get(source)
        model = load_causal_lm(source, self.cfg, tokenizer)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def _ensure_model(self, model: list | None) -> nn.Module:
        """The model, loaded from the request's ``model`` reference when this actor has none yet."""
        if self.model is None:
            if not model:
                raise RuntimeError(
                    "this reference actor loads its model from its requests and the request carried none: "
                    "build the client from ReferencePool.handles(), which carries the model's reference")
            bundle = ray.get(model[0])
            self._load(bundle["source"], bundle["tokenizer"])
        return self.model

    # ------------------------------------------------------------------------------------- serving
    def logps(self, request_id: Any, batch: Mapping[str, Tensor], ld_alpha: float | None = None,
              model: list | None = None) -> tuple[Any, int, Tensor, Tensor]:
        """(request_id, weights_version, ref_chosen (B,), ref_rejected (B,)) for a collated pair batch. The
        batch's tensors may arrive as numpy and the log-probs leave as float32 numpy (``to_wire``): Ray moves
        numpy through its object store without pickling torch tensors."""
        self._ensure_model(model)
        on_device = {k: from_wire(batch[k], self.device) for k in request_keys(batch)}
        chosen, rejected = reference_logps(self.model, on_device, ld_alpha=ld_alpha, sharing=self.sharing)
        self.forwards += 1
        return request_id, self.version, to_wire(chosen.float()), to_wire(rejected.float())

    # ------------------------------------------------------------------------------------- TR-DPO
    @torch.no_grad()
    def mix(self, state_dict: Mapping[str, Tensor], alpha: float, version: int,
            model: list | None = None) -> int:
        """π_ref ← α·π_θ + (1-α)·π_ref (TR-DPO, arXiv 2404.09656), once per ``version``.

        A repeated call with an already applied version is a no-op (Ray may retry the task); a version
        more than one ahead means this actor missed a sync (it restarted) and raises.
        """
        self._ensure_model(model)
        if version <= self.version:
            return self.version
        if version != self.version + 1:
            raise RuntimeError(
                f"reference actor at weights version {self.version} was asked to apply sync {version}: it "
                "missed a sync (restarted?) and must be restored with load_state first")
        given = {param_name(k): v for k, v in state_dict.items()}
        for name, p in params_by_name(self.model, given).items():
            mix_tensor(p, given[name], alpha)
        self.version = version
        return self.version

    @torch.no_grad()
    def load_state(self, state_dict: Mapping[str, Tensor], version: int, model: list | None = None) -> int:
        """Overwrite the parameters with ``state_dict`` (a peer's weights) and adopt its version."""
        self._ensure_model(model)
        given = {param_name(k): v for k, v in state_dict.items()}
        for name, p in params_by_name(self.model, given).items():
            p.copy_(given[name].to(device=p.device, dtype=p.dtype))
        self.version = version
        return self.version

    def state_dict(self, model: list | None = None) -> dict[str, Tensor]:
        """The parameters on CPU, named as ``named_parameters`` names them (tied weights once)."""
        return {n: p.detach().cpu() for n, p in self._ensure_model(model).named_parameters()}

    # ------------------------------------------------------------------------------------- health
    def weights_version(self) -> int:
        return self.version

    def ping(self, model: list | None = None) -> dict[str, Any]:
        """Health and identity; with ``model``, also loads the model (the pool's readiness check)."""
        if model:
            self._ensure_model(model)
        return {"loaded": self.model is not None, "pid": os.getpid(), "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "version": self.version,
                "forwards": self.forwards}


ReferenceActor = ray.remote(ReferenceModelHost)
