"""Prompts and batched greedy generation for LLM-KICK's generative tasks.

Prompts are LLM-KICK's (VITA-Group/llm-kick @ 70f98d7):

- factoid QA (`factoid_qa/main_freebase.py`):
  "Please give answer to this question: {q}\\nThe answer is " (trailing space included);
- ICR-QA (`incontext_qa/main_icrqa.py`): closed book "Answer these questions:\\n\\nQ: {q}\\nA:",
  open book "{evidence}\\n\\nBased on these texts, answer these questions:\\n\\nQ: {q}\\nA:",
  the evidence cut to a token budget (theirs: 3,072 characters);
- instruction following: the tokenizer's chat template when it has one (LLM-KICK used
  FastChat's Vicuna template for Vicuna models), else "USER: {q}\\nASSISTANT:".

Decoding is greedy (`do_sample=False`), batched with left padding. Short-answer tasks
stop at the first newline (the answer is the first line, as LLM-KICK's ICR-QA takes it),
which also saves most of the generation time on CPU.
"""

from __future__ import annotations

import contextlib


def factoid_prompt(question: str) -> str:
    return f"Please give answer to this question: {question}\nThe answer is "


def icr_prompt(question: str, evidence: str | None = None) -> str:
    if evidence is None:
        return f"Answer these questions:\n\nQ: {question}\nA:"
    return f"{evidence}\n\nBased on these texts, answer these questions:\n\nQ: {question}\nA:"


def truncate_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """text cut to its first max_tokens tokens (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def instruction_prompt(tokenizer, question: str) -> tuple[str, bool]:
    """(prompt, whether it already carries the special tokens of a chat template)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        return text, True
    return f"USER: {question}\nASSISTANT:", False


@contextlib.contextmanager
def _left_padding(tokenizer):
    """Left padding (needed for batched generation) without leaving the caller's tokenizer changed."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def greedy_generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    device=None,
    stop_at_newline: bool = True,
    add_special_tokens: bool = True,
) -> list[str]:
    """Greedy continuations (decoded, special tokens skipped) of each prompt."""
    import torch

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be at least 1")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    extra = {"stop_strings": ["\n"], "tokenizer": tokenizer} if stop_at_newline else {}
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with _left_padding(tokenizer), torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=add_special_tokens).to(device)
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                    **extra,
                )
                new = out[:, enc["input_ids"].shape[1] :]
                outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs
