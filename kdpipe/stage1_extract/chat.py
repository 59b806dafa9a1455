"""Chat conversations -> token ids and the loss mask of what a student learns (the assistant's turns).

The teacher's own chat template renders the conversation. Each assistant turn's characters are found by
rendering the conversation up to the turn (with the generation prompt, which is what the model sees
before it answers) and through it: what lies between is the answer, its end-of-turn marker included (as
TRL's assistant-only loss counts it), the template's whitespace after the marker not (the model stops at
the marker). Tokens whose first character lies in an answer are learned.
"""

from __future__ import annotations

from kdpipe.errors import UserError
from kdpipe.stage1_extract.packing import Piece


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template, so conversations cannot be rendered: pass a --tokenizer "
                        "with one (an -Instruct model's), or use --text-field for plain text")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("chat data needs a fast tokenizer (character offsets find the assistant's tokens): pass "
                        "--tokenizer with a tokenizer.json")


def render_conversation(messages: list[dict], tokenizer, learn_all: bool = False) -> Piece:
    """The conversation's ids and, per id, 1 where the student learns it."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        through = _render(tokenizer, messages[:i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise UserError("the chat template renders a conversation differently from its beginning (it rewrites "
                            "earlier turns), so the assistant's tokens cannot be located: pass --learn-all-tokens")
        spans.append((len(before), len(through.rstrip())))  # the turn's end marker, not the newline after it
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if learn_all:
        learn = [1] * len(ids)
    else:
        learn = [int(any(a <= start < b for a, b in spans)) for start, _ in offsets]
    return Piece(ids, False, learn)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - a template raises whatever its author wrote (jinja2 errors mostly)
        raise UserError(f"the chat template cannot render a conversation ({type(exc).__name__}: {exc}): check its "
                        f"roles and order") from None
