"""One process of ``tests/test_distributed.py``: alone, or as a rank of a torchrun job.

For each case (a name, a config and ``--set`` overrides), trains from scratch into ``<results_dir>/<name>`` with
:func:`malloc.train.train`, recording the loss of every step, then loads a given checkpoint (by default the one it
trained) and replays the test split through the serving path and validates it through the batched forward. Rank 0
(or the lone process) writes what it saw as JSON.

    python tests/distributed_worker.py CASES.json OUT.json [CHECKPOINTS.json]
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py CASES.json OUT.json \
        CHECKPOINTS.json
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from malloc.config import load_config
from malloc.distributed import World, joined, launch_from_environment
from malloc.eval.evaluate import forward_metrics, replay
from malloc.results import atomic_write_json
from malloc.runner import build_view, load_model
from malloc.train import train


def run_case(case: dict[str, Any], checkpoint: str | None, world: World | None) -> dict[str, Any]:
    cfg = load_config(case["config"], case["overrides"])
    view = build_view(cfg)
    run_dir = Path(cfg.results_dir) / case["name"]
    losses: list[list[float]] = []
    _, result = train(cfg, view, run_dir, show_progress=False, world=world,
                      on_step=lambda epoch, step, loss: losses.append([epoch, step, loss]))
    chosen = Path(checkpoint) if checkpoint else run_dir / "best.pt"
    loaded = load_model(cfg, view.sequences.num_items, chosen)
    served = replay(cfg, loaded, view, "test", world=world)
    predictions = served.logits if served.logits is not None else served.ranks
    assert predictions is not None
    return {"losses": losses, "epochs_run": result.epochs_run,
            "checkpoint": str(run_dir / "best.pt"), "served": str(chosen), "test": served.metrics,
            "predictions": np.asarray(predictions).tolist(), "users": served.users.tolist(),
            "state_bytes": served.state_bytes.tolist(), "valid": forward_metrics(cfg, loaded, view, "valid", world),
            "threads": torch.get_num_threads()}


def main(argv: list[str]) -> int:
    cases = json.loads(Path(argv[0]).read_text())
    checkpoints = json.loads(Path(argv[2]).read_text()) if len(argv) > 2 else {}
    launch = launch_from_environment()
    with contextlib.ExitStack() as stack:
        world = None if launch is None else stack.enter_context(joined(launch, torch.device("cpu")))
        seen = {case["name"]: run_case(case, checkpoints.get(case["name"]), world) for case in cases}
        if world is None or world.is_main:
            atomic_write_json(argv[1], {"world_size": 1 if world is None else world.size, "cases": seen})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
