"""What a stored entry is valid for: the model that computed it and the memory scheme that shaped it.

An entry written by one model or scheme must never be served by another: a state holds keys and values of one
model's weights, compressed by one policy's rule. :func:`entry_identity` gives the identity an
:class:`~malloc.serving.engine.Engine` serves, from a model identity (the caller's, e.g. a digest of the
checkpoint file, or :func:`model_digest` of the weights) and :func:`scheme_identity` (the policy's name and knobs,
the trained-in scheme with its ratio and knobs, the stored dtype).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch

from malloc.configio import to_dict
from malloc.memory.policy import CachePolicy
from malloc.models.base import SequentialRecommender
from malloc.results import to_jsonable
from malloc.serving.engine import Engine
from malloc.serving.store.codec import EntryIdentity, canonical_json


def policy_spec(policy: CachePolicy) -> dict[str, Any]:
    """``{"name": ..., <every field>: value}`` of a cache policy; inner policies (wrappers) nest the same way."""
    spec: dict[str, Any] = {"name": policy.name}
    for field in dataclasses.fields(policy):
        value = getattr(policy, field.name)
        spec[field.name] = policy_spec(value) if isinstance(value, CachePolicy) else to_jsonable(value)
    return spec


def scheme_identity(engine: Engine) -> dict[str, Any]:
    """The scheme part of an entry's identity for the states ``engine`` writes: its policy (name and knobs),
    the model's trained-in scheme (name, memory ratio, knobs) and the stored dtype."""
    cfg = engine.model.cfg
    return {"policy": policy_spec(engine.policy),
            "architecture": {"scheme": cfg.scheme, "memory_ratio": cfg.memory_ratio, "knobs": to_jsonable(cfg.knobs)},
            "state_dtype": str(engine.state_dtype).removeprefix("torch.")}


def model_digest(model: SequentialRecommender) -> str:
    """A blake2b-160 digest (hex) of a model's config and of every parameter and buffer (name, dtype, shape,
    bytes): equal digests mean the same weights. Reads every weight once; compute it once per served model."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(canonical_json(to_dict(model.cfg)).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        if flat.numel():
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def entry_identity(engine: Engine, model: str | None = None) -> EntryIdentity:
    """The identity of the entries ``engine`` writes and may read: ``model`` (default :func:`model_digest` of
    the engine's model) and :func:`scheme_identity`."""
    return EntryIdentity(model=model if model is not None else model_digest(engine.model),
                         scheme=scheme_identity(engine))


__all__ = ["entry_identity", "model_digest", "policy_spec", "scheme_identity"]
