"""Typed hyperparameters shared by the backbones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Upper bounds of the size fields: far above any model this benchmark trains, far below what exhausts memory
SIZE_LIMITS = {"dim": 1 << 16, "layers": 256, "heads": 1024, "head_dim": 1 << 16, "max_len": 1 << 24,
               "pos_buckets": 1 << 16, "time_buckets": 1 << 16, "ffn_mult": 64}


@dataclass(frozen=True)
class ModelConfig:
    """Backbone hyperparameters.

    Attributes:
        backbone: "hstu" (pointwise SiLU attention, arXiv 2402.17152) or "sasrec" (causal softmax, arXiv 1808.09781).
        dim: model width ``D``.
        layers: number of attention layers ``L``.
        heads: attention heads ``H`` (at least 4 by default, so head-level schemes have room).
        head_dim: per-head key/value width ``d_k = d_v``.
        dropout: dropout rate in training.
        max_len: training window in events; HSTU divides attention by it (a constant normaliser keeps stored
            state valid across appends); SASRec's learned position table has this many rows.
        pos_buckets: HSTU relative-position bias buckets (log-spaced distance).
        time_buckets: HSTU relative-time bias buckets (log-spaced seconds).
        ffn_mult: SASRec feed-forward width as a multiple of ``dim``.
        state_dtype: dtype of stored keys/values ("float32" is the exact reference).
        scheme: the trained-in architecture scheme of the attention layers ("native": plain multi-head
            attention); a name from ``malloc.memory.schemes.ARCHITECTURES`` (``malloc methods`` lists them).
        memory_ratio: the scheme's target stored bytes / Native stored bytes, in (0, 1]; the scheme turns it
            into its own knob by the rule its docstring states.
        knobs: the scheme's knobs set explicitly (they override what ``memory_ratio`` implies).
        item_prior: CTR: add a per-item bias to the click logit, initialised from each item's smoothed training
            log-odds (the global log-odds in the head's bias) and trained at ``train.prior_lr`` without weight decay,
            so the layers need not learn each item's base rate through attention.
        candidate: CTR: what the layers see of a candidate. "item": its item embedding (and the "unknown" action),
            so attention can pick the history events that bear on this item; "query": a learned query embedding, the
            same for every candidate, so the layers compute a user vector at the candidate's position and time and
            the item acts through the readout only (needs ``ctr_readout = "dot"``). Either way a candidate never
            enters the state.
        ctr_readout: CTR: the click logit of a candidate's output ``h``: "head", a linear head ``w . h + b``; "dot",
            that plus ``<W h, e_item>`` (a factorisation of the user vector with the item's embedding).
        absolute_positions: HSTU: generative-recommenders' input (arXiv 2402.17152's code): the item embedding
            times ``sqrt(dim)`` plus a learned absolute-position embedding (``max_len`` rows, later positions share
            the last; initialised with standard deviation ``sqrt(1 / dim)``), besides the relative bias. False: the
            item embedding alone, order from the relative bias only. A token's position is fixed when it is
            appended, so stored state stays valid. SASRec always has its own positions (setting it there is an error).
            Measured (docs/CHOICES.md): it helps HSTU's retrieval and hurts its CTR, so the retrieval configs set it
            and the default stays False.
        l2_norm: retrieval: score items by the cosine of the user representation and the item embedding (both
            L2-normalised; train with ``train.temperature`` well below 1) instead of the raw dot product.
    """

    backbone: Literal["hstu", "sasrec"] = "hstu"
    dim: int = 64
    layers: int = 2
    heads: int = 4
    head_dim: int = 16
    dropout: float = 0.2
    max_len: int = 200
    pos_buckets: int = 64
    time_buckets: int = 64
    ffn_mult: int = 1
    state_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    scheme: str = "native"
    memory_ratio: float = 1.0
    knobs: dict[str, Any] = field(default_factory=dict)
    item_prior: bool = True
    candidate: Literal["item", "query"] = "query"
    ctr_readout: Literal["head", "dot"] = "dot"
    absolute_positions: bool = False
    l2_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "layers", "heads", "head_dim", "max_len", "pos_buckets", "time_buckets", "ffn_mult"):
            if not 1 <= getattr(self, name) <= SIZE_LIMITS[name]:
                raise ValueError(f"{name} must be in 1..{SIZE_LIMITS[name]:,}, got {getattr(self, name)}")
        if self.heads * self.head_dim > SIZE_LIMITS["dim"]:
            raise ValueError(f"heads x head_dim must be at most {SIZE_LIMITS['dim']:,}, got "
                             f"{self.heads * self.head_dim:,}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.memory_ratio <= 1.0:
            raise ValueError(f"memory_ratio must be in (0, 1], got {self.memory_ratio}")
        if self.absolute_positions and self.backbone != "hstu":
            raise ValueError(f"absolute_positions is an HSTU option; {self.backbone} always has its own positions")
        if self.candidate == "query" and self.ctr_readout != "dot":
            raise ValueError("candidate 'query' shows the layers no item: it needs ctr_readout 'dot'")
