"""A training-free comparison scorer for the damage diagnostic: unit importance from calibration activations.

Light-PEFT ranks heads and FFN neurons by learned mask values. To tell "the masks learned little in 40 steps" from
"these units cannot be pruned cheaply at all", this scores the same units from one pass over task examples, no
training: an FFN neuron j scores mean|a_j| * ||W_down[:, j]||_2 (its average contribution to the residual stream),
a head h scores mean ||x_h||_2 * ||W_o[:, h]||_F over the o_proj input slice of that head. Module and rank scores
are copied from the estimate (they do not affect the pruned base). A measuring stick on the frozen base model; the
pipeline's `prune.unit_scores: activation` (lightpeft_dist/pruning/activation.py) collects the same statistics during the
estimation run itself, on the tokens the estimate trains on.
"""

from __future__ import annotations

import torch

from lightpeft_dist.data.batches import Collator, encode_split, load_rows
from lightpeft_dist.models.families import family_for, head_dim_of
from lightpeft_dist.pruning.scores import Scores


@torch.no_grad()
def activation_scores(model, tokenizer, recipe, like: Scores, examples: int = 128, batch_size: int = 8) -> Scores:
    spec = family_for(model)
    head_dim = head_dim_of(model.config)
    layers = spec.decoder_layers(model)
    sums_ffn = [torch.zeros(0) for _ in layers]
    sums_head = [torch.zeros(0) for _ in layers]
    count = [0]
    hooks = []
    for i, layer in enumerate(layers):
        mlp_down, attn_out = spec.proj(layer, spec.ffn_out_proj), spec.proj(layer, spec.head_out_proj)

        def ffn_hook(_m, args, i=i):
            a = args[0].float().abs().reshape(-1, args[0].shape[-1]).sum(0)
            sums_ffn[i] = a if sums_ffn[i].numel() == 0 else sums_ffn[i] + a

        def head_hook(_m, args, i=i):
            x = args[0].float().reshape(-1, args[0].shape[-1] // head_dim, head_dim).norm(dim=-1).sum(0)
            sums_head[i] = x if sums_head[i].numel() == 0 else sums_head[i] + x

        hooks += [mlp_down.register_forward_pre_hook(ffn_hook), attn_out.register_forward_pre_hook(head_hook)]
    rows = load_rows(recipe.data, "train").select(range(examples))
    encoded = encode_split(rows, recipe.data, tokenizer, recipe.train.seq_len)
    collate = Collator(tokenizer.pad_token_id)
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate([encoded[j] for j in range(start, min(start + batch_size, len(encoded)))])
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            count[0] += int(batch["input_ids"].numel())
    finally:
        for h in hooks:
            h.remove()
    head, ffn = [], []
    for i, layer in enumerate(layers):
        w_down = spec.proj(layer, spec.ffn_out_proj).weight.float()
        w_o = spec.proj(layer, spec.head_out_proj).weight.float()
        ffn.append(sums_ffn[i] / count[0] * w_down.norm(dim=0))
        w_o_heads = w_o.reshape(w_o.shape[0], -1, head_dim).norm(dim=(0, 2))
        head.append(sums_head[i] / count[0] * w_o_heads)
    return Scores(head=head, ffn=ffn, module=dict(like.module), rank=dict(like.rank))
