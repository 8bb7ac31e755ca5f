"""APT's block salience, accumulated from the training step's own forward and backward (no extra passes).

Blocks: a KV group per layer (one KV head and its query heads; for MHA a group is one head) and an FFN neuron. Per
optimizer step, a block's score is

    S = sum_{c in block} (sum_tokens |z_c|) * (sum_tokens |g_c|)  +  sqrt(max(kurtosis, 0))

where z is the block's input to its output projection (o_proj columns of the group's query heads, the neuron's
down_proj column), g = dL/dz, both sums over the step's real tokens on every rank before the product (the
first-order tracker, pruning/taylor.py, does the hooking and the cross-rank sum), and the kurtosis term is
kurtosis.py's, over O = W * mean(z) of the block. Scores are then accumulated over steps: summed (one-shot
calibration, as the reference's static scorer) or as an EMA with factor beta (running salience, gradual mode).

Why groups rather than query heads under GQA: a KV group is the smallest attention unit whose removal frees a whole
k/v projection slice and leaves a valid GQA layer for any choice of kept blocks, so the budget search can count its
cost exactly (docs/method.md, "APT").
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ...models.families import family_for, head_dim_of, layer_shapes, unwrap
from ...pruning.taylor import FirstOrderTracker
from ...runtime import Runtime
from ...training.zero import gathered
from .hidden import HiddenSalience
from .kurtosis import excess_kurtosis, outlier_term

log = logging.getLogger(__name__)
KINDS = ("group", "ffn")


def output_weight(module: nn.Module) -> tuple[list[torch.Tensor], callable]:
    """The parameters to gather and a function giving the effective weight of an output projection: the frozen
    weight plus the LoRA delta when the projection carries LoRA (the reference merges it)."""
    base = getattr(module, "base_layer", module)
    adapters = [a for a in getattr(module, "lora_A", {}) if a in getattr(module, "active_adapters", [])]
    params = [base.weight] + [p for a in adapters for p in (module.lora_A[a].weight, module.lora_B[a].weight)]

    def value() -> torch.Tensor:
        w = base.weight.detach().double()
        for a in adapters:
            w = w + module.get_delta_weight(a).detach().double()
        return w

    return params, value


class AptSalience:
    """Per-step APT salience of KV groups and FFN neurons, summed (`beta` None) or EMA-smoothed across steps."""

    def __init__(self, model: nn.Module, runtime: Runtime, use_kurtosis: bool = True, beta: float | None = None,
                 hidden: bool = False):
        base = unwrap(model)
        spec = family_for(base)
        self.shapes = layer_shapes(base)
        self.head_dim = head_dim_of(base.config)
        self.use_kurtosis, self.beta = use_kurtosis, beta
        self.first_order = FirstOrderTracker(model, runtime)
        layers = spec.decoder_layers(base)
        self._out = {"group": [getattr(spec.attention(layer), spec.head_out_proj) for layer in layers],
                     "ffn": [getattr(spec.ffn(layer), spec.ffn_out_proj) for layer in layers]}
        sizes = {"group": [s["num_key_value_heads"] for s in self.shapes],
                 "ffn": [s["intermediate_size"] for s in self.shapes]}
        self.kinds = KINDS + ("hidden",) * hidden  # hidden: one tensor of hidden_size scores, for all layers
        if hidden:
            sizes["hidden"] = [base.config.hidden_size]
            self.hidden = HiddenSalience([m for i in range(len(layers)) for m in (self._out["group"][i],
                                                                                   self._out["ffn"][i])],
                                         base.config.hidden_size, runtime)
        self.total = {k: [torch.zeros(n, dtype=torch.float64) for n in sizes[k]] for k in self.kinds}
        self.parts = {(k, p): [torch.zeros(n, dtype=torch.float64) for n in sizes[k]]
                      for k in self.kinds for p in ("salience", "kurtosis")}  # summed, for the record
        self.steps = 0

    @property
    def recording(self) -> bool:
        return self.first_order.recording

    @recording.setter
    def recording(self, value: bool) -> None:
        self.first_order.recording = value
        if "hidden" in self.kinds:
            self.hidden.recording = value

    @property
    def token_mask(self) -> torch.Tensor | None:
        return self.first_order.token_mask

    @token_mask.setter
    def token_mask(self, value: torch.Tensor | None) -> None:
        self.first_order.token_mask = value
        if "hidden" in self.kinds:
            self.hidden.token_mask = value

    def block_width(self, kind: str, i: int) -> int:
        """Input coordinates of one block of `kind` in layer i."""
        if kind == "ffn":
            return 1
        s = self.shapes[i]
        return s["num_attention_heads"] // s["num_key_value_heads"] * self.head_dim

    def end_step(self) -> dict[str, list[torch.Tensor]]:
        """Close an optimizer step (collective: every rank calls it): this step's block scores, accumulated into the
        totals; returns the step's scores."""
        _, salience = self.first_order.end_step()
        mean = self.first_order.last_mean
        step: dict[str, list[torch.Tensor]] = {k: [] for k in self.kinds}
        hidden_s = self.hidden.end_step() if "hidden" in self.kinds else None
        hidden_kurt = torch.zeros(self.total["hidden"][0].numel(), dtype=torch.float64) if hidden_s is not None \
            else None
        for kind, per_unit, means in (("group", salience.head, mean.head), ("ffn", salience.ffn, mean.ffn)):
            for i, (s, m) in enumerate(zip(per_unit, means, strict=True)):
                s = s.double().reshape(len(self.total[kind][i]), -1).sum(-1)  # query heads -> their KV group
                kurt = torch.zeros_like(s)
                if self.use_kurtosis:
                    params, value = output_weight(self._out[kind][i])
                    with gathered(params):
                        w = value()
                        kurt = outlier_term(w, m, self.block_width(kind, i))
                        if hidden_kurt is not None:  # row i of O: across the projection's input channels
                            o = w * m.double().to(w.device)[None, :]
                            hidden_kurt += excess_kurtosis(o, 1).clamp_min(0).sqrt().cpu()
                self.parts[kind, "salience"][i] += s
                self.parts[kind, "kurtosis"][i] += kurt
                step[kind].append(s + kurt)
        if hidden_s is not None:
            self.parts["hidden", "salience"][0] += hidden_s
            self.parts["hidden", "kurtosis"][0] += hidden_kurt
            step["hidden"].append(hidden_s + hidden_kurt)
        for kind in self.kinds:
            for i, value in enumerate(step[kind]):
                if self.beta is None:
                    self.total[kind][i] += value
                else:
                    self.total[kind][i] = self.beta * self.total[kind][i] + (1 - self.beta) * value
        self.steps += 1
        return step

    def scores(self) -> dict[str, list[torch.Tensor]]:
        return {k: [t.clone() for t in v] for k, v in self.total.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"steps": torch.tensor(self.steps)}
        for kind in self.kinds:
            state.update({f"{kind}.{i}": t for i, t in enumerate(self.total[kind])})
            for part in ("salience", "kurtosis"):
                state.update({f"{part}.{kind}.{i}": t for i, t in enumerate(self.parts[kind, part])})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps = int(state["steps"])
        for kind in self.kinds:
            self.total[kind] = [state[f"{kind}.{i}"].clone().double() for i in range(len(self.total[kind]))]
            for part in ("salience", "kurtosis"):
                self.parts[kind, part] = [state[f"{part}.{kind}.{i}"].clone().double()
                                          for i in range(len(self.parts[kind, part]))]

    def remove(self) -> None:
        self.first_order.remove()
        if "hidden" in self.kinds:
            self.hidden.remove()
