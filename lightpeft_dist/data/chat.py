"""Chat SFT (`data.format: chat`): jsonl rows of `messages` rendered with the tokenizer's own chat template.

Why the template: a chat model was instruction-tuned on its template's exact tokens (role headers, end-of-turn
markers, a default system prompt); fine-tuning it on any other rendering teaches it a format it will never be
served in. The ids are therefore exactly `tokenizer.apply_chat_template(messages)`.

Which tokens carry the loss: the assistant turns only, found by rendering prefixes incrementally and diffing token
counts. For the assistant message i, the span runs from the end of `messages[:i]` rendered with the generation
prompt (the template's own assistant header) to the end of `messages[:i + 1]`: the reply's content and the
template's end-of-turn tokens, so the model learns to stop. `return_assistant_tokens_mask` would need
`{% generation %}` markers, which most shipped templates (SmolLM2's among them) lack; the incremental diff works with
any template that renders a conversation's prefix as a prefix of its tokens, and a template that does not (one
that treats the last turn specially) is refused with a clear error rather than given a wrong mask.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import LightPeftError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # as data/batches.py (which imports this module)


def message_problem(messages: Any) -> str | None:
    """Why a row's `messages` cannot be trained on (a malformed role sequence), or None."""
    if not isinstance(messages, list) or not messages:
        return "has no messages (an empty or missing 'messages' list)"
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {j + 1} is {type(m).__name__}, not an object with 'role' and 'content'"
        if m.get("role") not in ROLES:
            return f"message {j + 1} has unknown role {m.get('role')!r} (roles: {', '.join(ROLES)})"
        if not isinstance(m.get("content"), str):
            return f"message {j + 1} ({m['role']}) has no text 'content'"
    if not any(m["role"] == "assistant" for m in messages):
        return "has no assistant turn, so it has no tokens to put the loss on"
    return None


def check_rows(all_messages: Sequence[Any], where: str) -> None:
    """One error naming the first malformed row (1-based, as the file's line) and what is wrong with it."""
    for i, messages in enumerate(all_messages):
        problem = message_problem(messages)
        if problem:
            raise LightPeftError(f"{where}: row {i + 1} {problem}; every chat row needs 'messages': a list of "
                                 f"{{'role': {'|'.join(ROLES)}, 'content': text}} with at least one assistant turn")


def require_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise LightPeftError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '') or ''} has no chat template, "
                             "which data.format chat needs; use a chat model's tokenizer (model.tokenizer) or "
                             "data.format sft")


def render(tokenizer: Any, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` exactly as the tokenizer's chat template gives them."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=True)
    return list(out["input_ids"])


def assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids of the whole conversation, [start, end) token spans of the assistant turns)."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(tokenizer, messages[:i], generation_prompt=True)
        upto = render(tokenizer, messages[:i + 1])
        if full[:len(head)] != head or full[:len(upto)] != upto or len(head) > len(upto):
            raise LightPeftError(f"the chat template of {getattr(tokenizer, 'name_or_path', 'the tokenizer')} does not "
                                 f"render the conversation up to message {i + 1} as a prefix of the whole one, so "
                                 "its assistant tokens cannot be found; use a template without last-turn special cases")
        spans.append((len(head), len(upto)))
    return full, spans


def encode_chat(messages: list[dict], tokenizer: Any, seq_len: int) -> dict[str, list[int]]:
    """One chat row -> {"input_ids", "labels"}: labels are the ids on assistant spans and -100 elsewhere.

    Too long a conversation loses its oldest tokens (a leading BOS survives), never the last assistant turn's
    start; a last turn longer than seq_len - 1 is itself cut from the right (as sft cuts responses, batches._fit).
    """
    require_template(tokenizer)
    ids, spans = assistant_spans(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    if len(ids) > seq_len:
        from .batches import _fit

        pairs = list(zip(ids, labels))
        last = spans[-1][0]
        bos = pairs[0] if tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else None
        head, tail = _fit(pairs[:last], pairs[last:], seq_len, bos)  # _fit compares the first item with `bos`
        ids, labels = [p[0] for p in head + tail], [p[1] for p in head + tail]
    return {"input_ids": ids, "labels": labels}
