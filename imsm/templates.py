"""Prompt templates, shared by training and decoding so that a prompt is tokenized the same way in both.

``raw``  the paper's prompts as they are (no chat markup); the answer follows the prompt after one space, and the
         closing token is the tokenizer's EOS.
``chat`` the tokenizer's own chat template: the prompt is the user turn (after an optional system turn), the answer is
         the assistant turn, closed by the template's end-of-turn token.

The query span that IMSM averages over is everything ``encode_prompt`` returns. ``prompt_parts`` splits it into the
template's frame (what comes before and after the user's text) and the text itself, so a prompt that must be cut
loses words of the user's text, never the template's structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PromptTemplate:
    tokenizer: object
    system_prompt: str | None = None
    _empty_ids: list[int] | None = field(default=None, init=False, repr=False, compare=False)
    name = "base"

    def __post_init__(self) -> None:
        """Subclasses check here that the tokenizer supports them."""

    def encode_prompt(self, prompt: str) -> list[int]:
        raise NotImplementedError

    def encode_answer(self, prompt: str, answer: str) -> list[int]:
        """Token ids of the answer and its closing token, as they follow ``encode_prompt(prompt)``."""
        raise NotImplementedError

    def prompt_parts(self, prompt: str) -> tuple[list[int], list[int], list[int]]:
        """``encode_prompt(prompt)`` as (frame head, the user's text, frame tail); the three concatenate to it.

        The frame is what the ids share, at their start and at their end, with the ids of an empty prompt: for
        ``chat`` the system turn and user header before the text and the end of turn and assistant header after it,
        for ``raw`` a leading BOS. It is found on token ids, so it holds whatever the tokenizer merges at the seams.
        """
        ids = self.encode_prompt(prompt)
        if self._empty_ids is None:
            self._empty_ids = self.encode_prompt("")
        empty = self._empty_ids
        limit = min(len(ids), len(empty))
        head = 0
        while head < limit and ids[head] == empty[head]:
            head += 1
        tail = 0
        while tail < limit - head and ids[-1 - tail] == empty[-1 - tail]:
            tail += 1
        return ids[:head], ids[head:len(ids) - tail], ids[len(ids) - tail:]

    def _eos_terminated(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
        return ids if ids and ids[-1] == eos else ids + [eos]


class RawTemplate(PromptTemplate):
    name = "raw"

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_answer(self, prompt: str, answer: str) -> list[int]:
        text = answer.strip()
        if not text:
            return []
        sep = "" if not prompt or prompt[-1].isspace() else " "
        ids = list(self.tokenizer(sep + text, add_special_tokens=False)["input_ids"])
        return self._eos_terminated(ids)


class ChatTemplate(PromptTemplate):
    name = "chat"

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
            raise ValueError(
                f"--prompt_template chat: the tokenizer of {name!r} has no chat template; "
                "use --prompt_template raw or a tokenizer with a chat_template"
            )

    def _messages(self, prompt: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": prompt}]

    def _prompt_text(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template(self._messages(prompt), tokenize=False, add_generation_prompt=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        # The rendered template already holds its special tokens (BOS included where the template writes it).
        return list(self.tokenizer(self._prompt_text(prompt), add_special_tokens=False)["input_ids"])

    def encode_answer(self, prompt: str, answer: str) -> list[int]:
        text = answer.strip()
        if not text:
            return []
        head = self._prompt_text(prompt)
        full = self.tokenizer.apply_chat_template(
            self._messages(prompt) + [{"role": "assistant", "content": text}], tokenize=False
        )
        if not full.startswith(head):
            raise ValueError("the chat template renders the assistant turn in a way that changes the prompt part")
        tail = full[len(head) :].rstrip()
        ids = list(self.tokenizer(tail, add_special_tokens=False)["input_ids"])
        return self._eos_terminated(ids)


TEMPLATES: dict[str, type[PromptTemplate]] = {"raw": RawTemplate, "chat": ChatTemplate}


def build_template(name: str, tokenizer, system_prompt: str | None = None) -> PromptTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name](tokenizer, system_prompt)
