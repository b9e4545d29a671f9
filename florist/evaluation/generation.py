"""The paper's ``generate`` protocol: sample a short continuation of each prompt and look for the answer in it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batching import (
    check_lengths,
    context_limit,
    encode,
    inference,
    length_batches,
    model_device,
    pad,
    padding_id,
    run_batches,
)
from .questions import LETTERS, Question, mmlu_prompt, question_names


@dataclass(frozen=True)
class Sampling:
    """The paper's sampling settings for the ``generate`` protocol."""

    temperature: float = 0.2
    top_p: float = 0.6
    top_k: int = 30
    max_new_tokens: int = 32


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    batch_size: int = 16,
    seed: int = 0,
    sampling: Sampling = Sampling(),
    progress: bool = True,
) -> list[str]:
    """The paper's protocol: sample a continuation of each prompt (left-padded batches, seeded)."""
    from transformers import GenerationConfig

    seqs = [encode(tokenizer, mmlu_prompt(q)) for q in questions]
    lengths = [len(s) + sampling.max_new_tokens for s in seqs]
    check_lengths(
        "the prompt with the tokens to generate", lengths, context_limit(model, tokenizer), question_names(questions)
    )
    pad_id, out = padding_id(tokenizer), [""] * len(questions)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        num_beams=1,
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos,
    )
    device = model_device(model)
    with inference(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in run_batches("generating", length_batches([len(s) for s in seqs], batch_size), progress):
            # Generation appends on the right, so prompts are padded on the left.
            ids, mask = pad([seqs[i] for i in batch], pad_id, "left", device)
            new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
            for i, text in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                out[i] = text
    return out


def is_generated_hit(question: Question, generated: str) -> bool:
    """The paper's rule: "X." (the answer's letter) or the answer's text appears in the generated text."""
    return f"{LETTERS[question.answer]}." in generated or question.options[question.answer].strip() in generated
