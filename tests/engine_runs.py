"""Helpers for tests that drive a generation engine: random visual tokens and running
requests in batches."""
from __future__ import annotations

import numpy as np


def visual(cfg, seed):
    """Random visual tokens for ``cfg``'s frames, (num_visual_tokens, hidden) float32."""
    return np.random.default_rng(seed).standard_normal((cfg.num_visual_tokens, cfg.text.hidden_size)).astype(np.float32)


def run_batches(engine, batches) -> tuple[dict, dict]:
    """Add each batch of requests at once and step ``engine`` until idle before the next;
    -> (request id -> generated token ids, request id -> its final event's stats)."""
    tokens, stats = {}, {}
    for batch in batches:
        for request in batch:
            engine.add(request)
        while engine.has_work():
            for event in engine.step():
                if event.token_id is not None:
                    tokens.setdefault(event.request_id, []).append(event.token_id)
                if event.finish_reason is not None:
                    stats[event.request_id] = event.stats
    return tokens, stats
