"""The allocator: one byte budget for all users' states, and which user to cut when a state does not fit.

Three policies, all bookkeeping over dense user indices (the server does the reading, recompressing and deleting):

- ``uniform``: every user's state at one memory ratio (the schemes as the paper runs them); no cap. With a budget,
  the ratio is chosen so that the replay's final total meets it (:func:`malloc.serve.budget.uniform_ratio`).
- ``lru``: whole states at one ratio (Native by default); when a put would take the total past the budget, the
  least recently requested users are dropped, and recomputed from their event log on their next request (what
  GPU serving caches of HSTU do: eviction costs compute, not accuracy).
- ``adaptive``: per-user ratios on a ladder of levels (``ratio = top * 2^(-level/2)``). A requested user is served
  at the top level (its state grows back as events arrive); when the budget is exceeded, the stored user whose next
  step down loses the least per byte it frees is recompressed (:meth:`Allocator.victim`; the server takes it down
  as many steps at once as stay the cheapest cut); once no other user can be compressed further, the requester is
  stored at the highest level that fits (a user whose whole state exceeds the budget is stored compressed, not
  recomputed at its every request), and only when even its bottom level does not fit are whole users dropped,
  least recently requested first.

The adaptive choice. Cutting user ``v`` from ``k`` to ``k'`` kept events frees ``Δb`` bytes and loses
``w_v Δloss``, where ``Δloss = log(1 + k) - log(1 + k')`` (diminishing returns: the first events kept matter most,
so a halving costs a long state about ``log 2`` and a short one more) and ``w_v = exp(-(now - t_v) / T)`` weighs how
soon the user may be back (``t_v``: the time of its last request, ``T``: the mean gap between a user's requests
observed so far, or a fixed ``decay``). The victim minimises ``w_v Δloss / Δb``; in logs,
``key_v = t_v / T + log Δloss - log Δb`` (``now`` is common to all users), so the keys do not change with time and
live in a heap, rebuilt only when ``T`` is re-estimated (each time the number of observed gaps doubles). Greedy
cuts of the cheapest step equalise the marginal loss per byte across users: the allocation that maximises
``sum_v w_v log(1 + k_v)`` for the budget (water-filling).

Every tie is broken by the user index, and the heaps hold nothing that is not derived from the arrays of
:meth:`Allocator.arrays`, so an allocator rebuilt from a checkpoint makes the same choices as the one that wrote it.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# the ladder: level l stores ratio top * 2^(-l / 2), down to 1/256 of the top
LEVELS = 17
DEFAULT_DECAY = 86_400.0  # seconds: T before any user has come back


def level_ratio(top: float, level: int) -> float:
    """The memory ratio of ``level`` on the ladder below ``top``."""
    return top * 2.0 ** (-level / 2.0)


@dataclass(frozen=True)
class Step:
    """A user's next step down the ladder: the level it goes to, the modelled loss and the bytes it frees."""

    level: int
    loss: float
    freed: int


class Allocator:
    """Who is stored, at which level, with how many bytes; what to cut to make room.

    Args:
        kind: ``uniform``, ``lru`` or ``adaptive`` (module docstring).
        num_users: dense users ``0 .. num_users - 1``.
        budget: total entry bytes allowed (None: no cap).
        start_time: the first request's timestamp (keys count time from it).
        decay: the adaptive time constant in seconds (0: learnt, the mean observed gap).
    """

    def __init__(self, kind: str, num_users: int, budget: int | None, start_time: int, decay: float = 0.0) -> None:
        self.kind = kind
        self.budget = budget
        self.start_time = int(start_time)
        self.fixed_decay = float(decay)
        self.level = np.full(num_users, -1, dtype=np.int16)
        self.size = np.zeros(num_users, dtype=np.int64)
        self.last_time = np.zeros(num_users, dtype=np.int64)
        self.last_seq = np.full(num_users, -1, dtype=np.int64)
        self.version = np.zeros(num_users, dtype=np.int64)
        self.step_level = np.full(num_users, -1, dtype=np.int16)
        self.step_loss = np.zeros(num_users, dtype=np.float64)
        self.step_freed = np.zeros(num_users, dtype=np.int64)
        self.count = 0  # users stored
        self.total = 0
        self.peak = 0
        self.byte_requests = 0  # the sum over served requests of the total after each (its mean over time)
        self.requests = 0
        self.gap_sum = 0.0
        self.gap_count = 0
        self.heap_decay = self.fixed_decay or DEFAULT_DECAY
        self.rebuild_at = 1
        self.recompressions = 0
        self.drops = 0
        self.not_stored = 0
        self.requester_cuts = 0  # requests whose own entry was stored below the top of the ladder
        self._cuts: list[tuple[float, int, int]] = []
        self._drops: list[tuple[int, int, int]] = []

    # -- what the server asks -------------------------------------------------------------------------------------
    def seen(self, user: int) -> bool:
        """Whether ``user`` was requested before (a missing entry is then a drop, not a cold start)."""
        return bool(self.last_seq[user] >= 0)

    def fits(self, user: int, size: int) -> bool:
        """Whether ``user``'s entry of ``size`` bytes fits the budget in place of its current one."""
        return self.budget is None or self.total - int(self.size[user]) + size <= self.budget

    def victim(self, requester: int) -> tuple[int, int | None] | None:
        """The next user to cut so that ``requester``'s state fits: ``(user, level)`` to recompress it to that
        level, ``(user, None)`` to drop it, or None when no other user is stored."""
        if self.kind == "adaptive":
            while self._cuts:
                _, user, version = heapq.heappop(self._cuts)
                if version == self.version[user] and user != requester and self.step_level[user] >= 0:
                    return user, int(self.step_level[user])
        while self._drops:
            _, user, version = heapq.heappop(self._drops)
            if version == self.version[user] and user != requester and self.level[user] >= 0:
                return user, None
        return None

    def cheapest(self, requester: int) -> float | None:
        """The key of the cheapest cut among the stored users other than ``requester`` (None: none), without
        taking it (stale entries, and the requester's, which its own put replaces, are dropped on the way)."""
        while self._cuts:
            _, user, version = self._cuts[0]
            if version == self.version[user] and self.step_level[user] >= 0 and user != requester:
                return self._cuts[0][0]
            heapq.heappop(self._cuts)
        return None

    def cut_key(self, user: int, step: Step) -> float:
        """The heap key of cutting ``user`` by ``step`` (module docstring): lower is cut first."""
        recency = (int(self.last_time[user]) - self.start_time) / self.heap_decay
        return recency + math.log(step.loss) - math.log(step.freed)

    # -- what the server reports ----------------------------------------------------------------------------------
    def stored(self, user: int, level: int, size: int, step: Step | None) -> None:
        """``user``'s entry is now ``size`` bytes at ``level``, with ``step`` its next step down (None: none)."""
        self.total += size - int(self.size[user])
        self.count += int(self.level[user] < 0)
        self.level[user], self.size[user] = level, size
        if step is None:
            self.step_level[user], self.step_loss[user], self.step_freed[user] = -1, 0.0, 0
        else:
            self.step_level[user], self.step_loss[user], self.step_freed[user] = step.level, step.loss, step.freed
        self.version[user] += 1
        self._push(user)
        self._compact()

    def dropped(self, user: int) -> None:
        """``user``'s entry was deleted (or never stored)."""
        self.total -= int(self.size[user])
        self.count -= int(self.level[user] >= 0)
        self.level[user], self.size[user], self.step_level[user] = -1, 0, -1
        self.version[user] += 1

    def requested(self, user: int, time: int, seq: int) -> None:
        """``user`` was served request ``seq`` at ``time``: its recency, and the gap since its last request."""
        if self.last_seq[user] >= 0:
            self.gap_sum += float(max(0, time - int(self.last_time[user])))
            self.gap_count += 1
        self.last_time[user], self.last_seq[user] = time, seq

    def request_done(self) -> None:
        """Close a request: the peak and the running mean of the total, and ``T`` re-estimated when due."""
        self.peak = max(self.peak, self.total)
        self.byte_requests += self.total
        self.requests += 1
        if self.kind == "adaptive" and not self.fixed_decay and self.gap_count >= self.rebuild_at:
            self.rebuild_at = 2 * self.gap_count
            self.heap_decay = max(1.0, self.gap_sum / self.gap_count)
            self._rebuild()

    # -- heaps -----------------------------------------------------------------------------------------------------
    def _cut_key(self, user: int) -> float:
        return self.cut_key(user, Step(int(self.step_level[user]), float(self.step_loss[user]),
                                       int(self.step_freed[user])))

    def _push(self, user: int) -> None:
        version = int(self.version[user])
        if self.level[user] < 0 or self.budget is None:
            return
        if self.kind == "adaptive" and self.step_level[user] >= 0:
            heapq.heappush(self._cuts, (self._cut_key(user), user, version))
        heapq.heappush(self._drops, (int(self.last_seq[user]), user, version))

    def _rebuild(self) -> None:
        self._cuts, self._drops = [], []
        for user in np.flatnonzero(self.level >= 0).tolist():
            self._push(user)

    def _compact(self) -> None:
        if len(self._drops) + len(self._cuts) > 4 * self.count + 4096:
            self._rebuild()

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        return {"level": self.level, "size": self.size, "last_time": self.last_time, "last_seq": self.last_seq,
                "version": self.version, "step_level": self.step_level, "step_loss": self.step_loss,
                "step_freed": self.step_freed}

    def scalars(self) -> dict[str, Any]:
        return {"count": self.count, "total": self.total, "peak": self.peak, "byte_requests": self.byte_requests,
                "requests": self.requests, "gap_sum": self.gap_sum, "gap_count": self.gap_count,
                "heap_decay": self.heap_decay, "rebuild_at": self.rebuild_at, "recompressions": self.recompressions,
                "drops": self.drops, "not_stored": self.not_stored,
                "requester_cuts": self.requester_cuts}

    def restore(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        """Take the state :meth:`arrays` and :meth:`scalars` saved; the heaps are rebuilt from it."""
        for name, array in self.arrays().items():
            stored = np.asarray(arrays[name])
            if stored.shape != array.shape:
                raise ValueError(f"allocator array {name} has shape {stored.shape}, expected {array.shape}")
            array[...] = stored
        for name in self.scalars():
            setattr(self, name, type(getattr(self, name))(scalars[name]))
        self._rebuild()


__all__ = ["DEFAULT_DECAY", "LEVELS", "Allocator", "Step", "level_ratio"]
