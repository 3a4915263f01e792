"""Reward-model term: an HF ``*ForSequenceClassification`` model scores (prompt, response) texts, batched.

The text is the tokenizer's chat template over ``[user: prompt, assistant: response]`` when it has one
(how RLHF reward models are trained), else ``prompt + "\\n\\n" + response``. Batches are right-padded (so
positions match an unpadded forward) and sorted by length (little padding); the model reads the score at
the last non-pad token, so ``pad_token_id`` is set from the tokenizer when the config lacks it. Texts
longer than ``max_length`` keep their end (the response). The score is the raw logit ``label_index``:
exactly what a direct transformers forward of the same text gives.
"""

from __future__ import annotations

from typing import Optional, Sequence

from r1mega.config.schema import ModelRewardConfig


def reward_model_text(tokenizer, prompt: str, response: str) -> str:
    """What the reward model reads for one sample (see module docstring)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{prompt}\n\n{response}"


class RewardModelScorer:
    """Loads ``cfg.path`` once (CUDA when available, else CPU) and scores batches of texts."""

    def __init__(self, cfg: ModelRewardConfig):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.path)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        self.model = AutoModelForSequenceClassification.from_pretrained(cfg.path, dtype=dtype).to(self.device)
        self.model.eval()
        labels = self.model.config.num_labels
        if not 0 <= cfg.label_index < labels:
            raise ValueError(f"reward model {cfg.name!r}: label_index={cfg.label_index} but {cfg.path} has "
                             f"{labels} output label(s); set reward.models[].label_index below {labels}")
        pad = self._pad_id()
        self.tokenizer.pad_token_id = pad
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = pad

    def _pad_id(self) -> int:
        for candidate in (self.model.config.pad_token_id, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
                          self.model.config.eos_token_id):
            if isinstance(candidate, list):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return int(candidate)
        return 0

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores: list[Optional[float]] = [None] * len(texts)
        step = max(1, self.cfg.batch_size)
        for start in range(0, len(order), step):
            idx = order[start:start + step]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=self.cfg.max_length, return_tensors="pt").to(self.device)
            with torch.no_grad():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for i, value in zip(idx, logits[:, self.cfg.label_index].float().tolist()):
                scores[i] = value
        return [float(s) for s in scores]

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> list[tuple[float, Optional[str]]]:
        joined = [reward_model_text(self.tokenizer, p, t) for p, t in zip(prompts, texts)]
        return [(s, None) for s in self.score_texts(joined)]
