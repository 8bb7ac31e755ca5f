"""What each of APT's gradual pruning checkpoints buys: the model's parameters and the training tokens/s around it.

Why: pruning during training pays off only through the faster steps after each prune, so the train record shows,
per checkpoint, the parameter count of the model before and after it (counted on the model itself, ZeRO-3
partitions in full, with the LoRA grown at the same checkpoint) and the job's tokens/s over the steps since the
previous checkpoint (or the start) and over the steps after it up to the next one (or the end). The step times are
the loop's own (`on_metrics`: forward, backward, optimizer step, on this rank); the restructure itself is not in
them. Each segment between checkpoints also keeps its tokens and the structure counts of the model that trained on
them (models/loading.py `model_structure`), so the run's training FLOPs are summed segment by segment rather than
counted on the final model (train.json's `hooks.apt_gradual_segments`, docs/method.md "Cost accounting"). The state
is checkpointed with the hook's, so a resumed run keeps the segments measured before the kill.
"""

from __future__ import annotations

import json
import logging
import math

import torch

from ...models.loading import count_parameters, model_structure

log = logging.getLogger(__name__)
STATE_KEY = "apt_cost"  # saved as extra/apt_cost: outside the "apt." prefix the live prune drops or slices


class PruneCosts:
    """Per-checkpoint entries: `checkpoint`, `step`, `params_before`, `params_after`, `tokens_per_s_before`,
    `tokens_per_s_after` (None when no step was measured on that side), `speedup` (after / before); and per
    segment (the steps up to the first checkpoint, between two, after the last) `tokens` with the trained model's
    `matmul_weights`, `adapter_weights` and `query_width`."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self.segments: list[dict] = []
        self.tokens, self.seconds = 0, 0.0  # the segment since the last checkpoint
        self.pending = False  # the last entry's params_after waits for the rebuilt model

    def add_step(self, metrics: dict, model: torch.nn.Module) -> None:
        """One optimizer step's metrics; the first step after a checkpoint runs on its rebuilt model: count it."""
        if self.pending:
            self._after(model)
        tokens, rate = metrics.get("tokens") or 0, metrics.get("tokens_per_s") or 0.0
        if tokens > 0 and rate > 0:
            self.tokens += int(tokens)
            self.seconds += tokens / rate

    def checkpoint(self, k: int, step: int, model: torch.nn.Module) -> None:
        """Checkpoint k after `step`, before its restructure: the segment up to here closes the previous entry."""
        rate = self._close(model)
        self.entries.append({"checkpoint": k, "step": step, "params_before": count_parameters(model)["total"],
                             "params_after": None, "tokens_per_s_before": rate, "tokens_per_s_after": None,
                             "speedup": None})
        self.pending = True

    def finish(self, model: torch.nn.Module) -> list[dict]:
        """After the last step: the last segment closes the last entry; the entries, each logged once."""
        if self.pending:
            self._after(model)
        self._close(model)
        return self.entries

    def _rate(self) -> float | None:
        rate = self.tokens / self.seconds if self.seconds > 0 else None
        return rate if rate is not None and math.isfinite(rate) else None

    def _close(self, model: torch.nn.Module) -> float | None:
        """The current segment's tokens/s, as the last entry's `after` (then logged), and its tokens with the counts
        of `model`, which trained on them; starts the next segment."""
        rate = self._rate()
        self.segments.append({"tokens": self.tokens, **model_structure(model)})
        if self.entries:
            e = self.entries[-1]
            before = e["tokens_per_s_before"]
            e["tokens_per_s_after"] = rate
            e["speedup"] = rate / before if rate and before else None
            log.info("APT pruning checkpoint %d after step %d: %s -> %s parameters, training %s -> %s tokens/s%s",
                     e["checkpoint"], e["step"], f"{e['params_before']:,}", f"{e['params_after']:,}",
                     _fmt(before), _fmt(rate), "" if e["speedup"] is None else f" (x{e['speedup']:.2f})")
        self.tokens, self.seconds = 0, 0.0
        return rate

    def _after(self, model: torch.nn.Module) -> None:
        self.entries[-1]["params_after"] = count_parameters(model)["total"]
        self.pending = False

    def state_dict(self) -> dict[str, torch.Tensor]:
        text = json.dumps({"entries": self.entries, "segments": self.segments, "tokens": self.tokens,
                           "seconds": self.seconds, "pending": self.pending}, sort_keys=True)
        return {STATE_KEY: torch.tensor(list(text.encode()), dtype=torch.uint8)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        saved = state.get(STATE_KEY)
        if saved is None:  # a checkpoint from before the cost record: start measuring here
            return
        data = json.loads(bytes(saved.tolist()).decode())
        self.entries, self.tokens, self.seconds = data["entries"], int(data["tokens"]), float(data["seconds"])
        self.segments = data.get("segments", [])  # none in a checkpoint from before the segment counts
        self.pending = bool(data["pending"])


def _fmt(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:,.0f}"
