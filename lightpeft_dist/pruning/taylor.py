"""First-order (Taylor) unit scores at the masks' position, and APT's salience from the same hook
(`prune.unit_scores: taylor`).

Why: the learned masks of a short estimate rank FFN neurons barely better than random, and the activation scores
ignore what the task needs (docs/results.md). The first-order estimate of the loss change when a unit is removed uses
the estimation run's own gradients, at no extra forward or backward. Write z = x * m for a unit's masked output at
the mask hooks' position (head h: its slice of the attention output projection's input; FFN neuron j: its coordinate
of the down projection's input) and g = dL/dz. Because z_c = x_c * m_u for every coordinate c of unit u,
m_u * dL/dm_u = sum_tokens sum_{c in u} z_c g_c. The Taylor score of u is

    taylor_u = sum over steps and examples e of | sum over e's real tokens, sum_{c in u} z_c g_c |,

i.e. |m_u * dL_e/dm_u| per example, then summed: the per-example abs keeps examples whose effects cancel from
hiding a unit that matters to each of them. L is the loss of the optimizer step as the engine minimises it (the mean
over micro-batches and ranks); a batch row is one example (the estimate does not pack). A unit whose mask is 0 or
whose output weights are 0 scores exactly 0.

The same hook also gives APT's salience: per optimizer step, sum_{c in u} (sum_tokens |z_c|) * (sum_tokens |g_c|),
both sums over the step's real tokens on every rank before the product, summed over steps. It is exposed by
`salience()` (and returned per step by `end_step`, for a running average) for the APT strategy; no file yet.

For APT's kurtosis term the hook also sums the signed input per coordinate and counts the real tokens; `end_step`
leaves the step's mean input (over every rank's real tokens) in `last_mean`.

The hooks are forward pre-hooks attached *after* the mask hooks (so they see x * m) that put a gradient hook on the
input tensor; they record only while `recording` is set, so a gradient-checkpointing recompute never counts twice.
(With a scalar mask both quantities would be the same read before it, since x dL/dx = (x m) dL/d(x m); the position
matters for a strategy without masks, which gets the plain projection input.)
Like the other trackers, per-step sums are added across ranks at every optimizer step (quantities linear in g
divided by the world size, since each rank's gradient is that of its own loss), so every rank holds the job's
totals and a checkpoint written by N ranks resumes on M. Under fp16 loss scaling the gradients carry the scale, as
for the LoRA rank scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models.families import family_for, head_dim_of, layer_shapes, unwrap
from ..runtime import Runtime
from .activation import token_weights

KINDS = ("head", "ffn")


@dataclass
class UnitValues:
    """One number per head and per FFN neuron, per layer."""

    head: list[torch.Tensor]
    ffn: list[torch.Tensor]


class FirstOrderTracker:
    """Taylor scores and APT salience of heads and FFN neurons (see the module docstring)."""

    def __init__(self, model: nn.Module, runtime: Runtime):
        base = unwrap(model)
        spec = family_for(base)
        self.head_dim = head_dim_of(base.config)
        self.runtime = runtime
        self.recording = False
        self.token_mask: torch.Tensor | None = None
        shapes = layer_shapes(base)
        device = next(base.parameters()).device
        units = {"head": [s["num_attention_heads"] for s in shapes], "ffn": [s["intermediate_size"] for s in shapes]}
        width = {"head": self.head_dim, "ffn": 1}  # input coordinates per unit
        zeros = lambda n, dev: torch.zeros(n, dtype=torch.float64, device=dev)  # noqa: E731
        # this optimizer step: per unit (taylor), per input coordinate (sum|z|, sum|g|, signed sum z), tokens
        self._step = {(q, k): [zeros(n * (width[k] if q != "taylor" else 1), device) for n in units[k]]
                      for q in ("taylor", "z_abs", "g_abs", "z_sum") for k in KINDS}
        self._step["tokens", "all"] = [zeros(1, device)]
        self.last_mean: UnitValues | None = None  # the last step's mean input per coordinate (APT's kurtosis)
        self.taylor_sum = UnitValues(*([zeros(n, "cpu") for n in units[k]] for k in KINDS))
        self.salience_sum = UnitValues(*([zeros(n, "cpu") for n in units[k]] for k in KINDS))
        self.steps = 0
        self._handles = []
        for i, layer in enumerate(spec.decoder_layers(base)):
            attn_out = getattr(spec.attention(layer), spec.head_out_proj)
            ffn_out = getattr(spec.ffn(layer), spec.ffn_out_proj)
            self._handles.append(attn_out.register_forward_pre_hook(self._on_input("head", i)))
            self._handles.append(ffn_out.register_forward_pre_hook(self._on_input("ffn", i)))

    def _on_input(self, kind: str, i: int):
        def hook(module, args):
            z = args[0]
            if not self.recording or not z.requires_grad:
                return
            weights = token_weights(self.token_mask, z, torch.float32)
            saved = z.detach()
            z.register_hook(lambda g: self._add(kind, i, saved, g.detach(), weights))
        return hook

    # Per-token work in fp32 (as ActivationTracker); per-example and per-unit sums in float64.
    def _add(self, kind: str, i: int, z: torch.Tensor, g: torch.Tensor, weights: torch.Tensor) -> None:
        z, g = z.float(), g.float()
        per_unit = z * g
        if kind == "head":
            per_unit = per_unit.unflatten(-1, (-1, self.head_dim)).sum(-1)  # [..., tokens, heads]
        per_example = (per_unit * weights[..., None]).sum(-2).double()  # [..., units]: one row per example
        self._step["taylor", kind][i] += per_example.abs().reshape(-1, per_example.shape[-1]).sum(0)
        w = weights.reshape(-1)
        self._step["z_abs", kind][i] += (w @ z.abs().reshape(-1, z.shape[-1])).double()
        self._step["g_abs", kind][i] += (w @ g.abs().reshape(-1, g.shape[-1])).double()
        self._step["z_sum", kind][i] += (w @ z.reshape(-1, z.shape[-1])).double()
        if kind == "head" and i == 0:
            self._step["tokens", "all"][0] += w.sum().double()

    def end_step(self) -> tuple[UnitValues, UnitValues]:
        """Reduce this optimizer step's sums across ranks (one collective), add them to the run totals, and return
        the step's (Taylor, salience) values, e.g. for APT's running average."""
        keys = list(self._step)
        flat = [t for key in keys for t in self._step[key]]
        reduced = self.runtime.all_reduce_sum(torch.cat(flat)).cpu().split([t.numel() for t in flat])
        world = float(self.runtime.world_size)
        parts, start = {}, 0
        for key in keys:
            n = len(self._step[key])
            parts[key] = [t / world if key[0] in ("taylor", "g_abs") else t for t in reduced[start:start + n]]
            start += n
        tokens = max(float(parts["tokens", "all"][0]), 1.0)
        self.last_mean = UnitValues(*([t / tokens for t in parts["z_sum", k]] for k in KINDS))
        taylor = UnitValues(parts["taylor", "head"], parts["taylor", "ffn"])
        salience = UnitValues(*([(za * ga).reshape(len(total), -1).sum(-1)
                                 for za, ga, total in zip(parts["z_abs", k], parts["g_abs", k],
                                                          getattr(self.taylor_sum, k), strict=True)]
                                for k in KINDS))
        for k in KINDS:
            for acc, part in zip(getattr(self.taylor_sum, k) + getattr(self.salience_sum, k),
                                 getattr(taylor, k) + getattr(salience, k), strict=True):
                acc += part
        for t in flat:
            t.zero_()
        self.steps += 1
        return taylor, salience

    def taylor(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(head scores, FFN scores) per layer, as written to the taylor scores file."""
        return [t.float() for t in self.taylor_sum.head], [t.float() for t in self.taylor_sum.ffn]

    def salience(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """APT's salience (head, FFN) per layer, summed over the steps so far."""
        return [t.float() for t in self.salience_sum.head], [t.float() for t in self.salience_sum.ffn]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"steps": torch.tensor(self.steps)}
        for name, values in (("", self.taylor_sum), ("salience_", self.salience_sum)):
            for k in KINDS:
                state.update({f"{name}{k}.{i}": t for i, t in enumerate(getattr(values, k))})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps = int(state["steps"])
        for name, values in (("", self.taylor_sum), ("salience_", self.salience_sum)):
            for k in KINDS:
                setattr(values, k, [state[f"{name}{k}.{i}"].clone().double() for i in range(len(getattr(values, k)))])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
