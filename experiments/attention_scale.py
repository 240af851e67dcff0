"""How large HSTU's attention output is against its LayerNorm's eps, in a trained run: events and beacons apart.

HSTU divides its SiLU attention by a constant ``N = max_len`` and then normalises the attended vector with a
LayerNorm before the ``u`` gate. A query that sees few keys, in a model with a large ``max_len``, sums few terms
over a large ``N``: when the attended vector's variance falls well below the LayerNorm's ``eps``, the norm no
longer rescales it and the attention path is muted. This script runs the full forward of a trained run over the
first ``--window`` events of a few training users and prints, per layer, the mean per-token variance of the
attended vector (the LayerNorm's input) for events and, when the scheme adds them, for beacons.

    python experiments/attention_scale.py results/cpu/long/runs/<run>/config.yaml      # a run the suite trained
    python experiments/attention_scale.py --users 2 --window 512 <config.yaml>
"""

from __future__ import annotations

import argparse
import sys

import torch

from malloc.config import load_config
from malloc.configio import ConfigError
from malloc.data.batching import history_tokens
from malloc.data.tasks import Window
from malloc.errors import MallocError
from malloc.models.hstu import HSTULayer
from malloc.runner import load_trained


def attended_variance(config: str, users: int, window: int) -> list[dict[str, float]]:
    """Per layer: ``{"layer", "events", "beacons", "eps", "normaliser"}`` (beacons NaN without beacons)."""
    cfg = load_config(config)
    if cfg.model.backbone != "hstu":
        raise ConfigError(f"{config}: model.backbone is {cfg.model.backbone!r}; this measures HSTU's normaliser")
    model, view, _ = load_trained(cfg)
    seqs = view.sequences
    lengths = seqs.lengths
    chosen = [u for u in range(len(lengths)) if lengths[u] > 0][:users]
    tokens = history_tokens(seqs, [Window(u, 0, min(window, int(lengths[u]))) for u in chosen])
    processed = tokens if model.scheme is None else model.scheme.expand(tokens)[0]
    beacon = torch.zeros_like(processed.valid) if processed.beacon is None else processed.beacon
    captured: dict[int, torch.Tensor] = {}
    layers = [layer for layer in model.layers if isinstance(layer, HSTULayer)]
    handles = [layer.output_norm.register_forward_pre_hook(
        lambda module, args, index=index: captured.__setitem__(index, args[0].detach()))
        for index, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for index, layer in enumerate(layers):
        attended = captured[index]  # (B, T', width)
        events = attended[processed.valid & ~beacon].var(dim=-1).mean().item()
        beacons = attended[beacon].var(dim=-1).mean().item() if bool(beacon.any()) else float("nan")
        out.append({"layer": index, "events": events, "beacons": beacons, "eps": layer.output_norm.eps,
                    "normaliser": layer.normaliser})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the config.yaml of a trained run (its results folder holds best.pt)")
    parser.add_argument("--users", type=int, default=4, help="training users to read (default 4)")
    parser.add_argument("--window", type=int, default=1024, help="events per user, from the first (default 1024)")
    args = parser.parse_args(argv)
    try:
        rows = attended_variance(args.config, args.users, args.window)
    except (MallocError, FileNotFoundError) as exc:
        print(f"attention_scale: {exc}", file=sys.stderr)
        return 2
    print("| layer | attended variance, events | attended variance, beacons | LayerNorm eps | N |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['layer']} | {row['events']:.3g} | {row['beacons']:.3g} | {row['eps']:g} "
              f"| {row['normaliser']:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
