"""Chat templates: a conversation -> the prompt text the policy continues, and the SFT target text.

- ``r1_zero``: the DeepSeek-R1-Zero training template, verbatim from the paper (Table 1).
- ``r1``: the DeepSeek-R1 chat format; the generation prompt prefills ``<think>\\n`` as R1 does.
- ``chatml``: ``<|im_start|>role ... <|im_end|>`` (Qwen and many others).
- ``plain``: the user text as is (the synthetic-task demo).

BOS/EOS are tokens, not text: the tokenizer adds them. ``generation_prefix`` is the part of the
assistant reply that the prompt already contains; rewards see it again via ``with_prefill``.
"""

from __future__ import annotations

from dataclasses import dataclass

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: {prompt}. Assistant:"
)

Messages = list[dict[str, str]]


def _split(messages: Messages) -> tuple[str, Messages]:
    """Leading system text and the remaining turns; the conversation must end with a user turn."""
    if not messages:
        raise ValueError("cannot render an empty conversation")
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("a generation prompt must end with a user message")
    return system, turns


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    generation_prefix: str = ""

    def prompt(self, messages: Messages) -> str:
        """Everything up to (and including) the start of the assistant's reply."""
        raise NotImplementedError

    def completion(self, content: str) -> str:
        """The assistant reply as trained on in SFT, ending with the template's end-of-turn text."""
        return content

    def render_sft(self, messages: Messages) -> tuple[str, str]:
        """``(prompt, completion)`` for a conversation whose last message is the assistant's."""
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("an SFT conversation must end with an assistant message")
        content = messages[-1]["content"]
        if self.generation_prefix and content.startswith(self.generation_prefix):
            content = content[len(self.generation_prefix):]  # the prompt already holds it
        return self.prompt(messages[:-1]), self.completion(content)


class R1ZeroTemplate(ChatTemplate):
    def prompt(self, messages: Messages) -> str:
        system, turns = _split(messages)
        history = "".join(
            f"User: {m['content']}. " if m["role"] == "user" else f"Assistant: {m['content']} "
            for m in turns[:-1]
        )
        text = R1_ZERO_TEMPLATE.format(prompt=turns[-1]["content"])
        if history:  # earlier turns go before the final "User: ..." in the same style
            cut = text.index("User: ")
            text = text[:cut] + history + text[cut:]
        return (system + "\n" + text) if system else text

    def completion(self, content: str) -> str:
        return " " + content


class R1Template(ChatTemplate):
    def prompt(self, messages: Messages) -> str:
        system, turns = _split(messages)
        parts = [system]
        for m in turns:
            if m["role"] == "user":
                parts.append(f"<｜User｜>{m['content']}")
            else:
                parts.append(f"<｜Assistant｜>{m['content']}<｜end▁of▁sentence｜>")
        return "".join(parts) + "<｜Assistant｜>" + self.generation_prefix

    def completion(self, content: str) -> str:
        return content + "<｜end▁of▁sentence｜>"


class ChatMLTemplate(ChatTemplate):
    def prompt(self, messages: Messages) -> str:
        _split(messages)
        body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return body + "<|im_start|>assistant\n"

    def completion(self, content: str) -> str:
        return content + "<|im_end|>"


class PlainTemplate(ChatTemplate):
    def prompt(self, messages: Messages) -> str:
        system, turns = _split(messages)
        if len(turns) != 1:
            raise ValueError("the plain template renders single-turn prompts only")
        return (system + "\n" if system else "") + turns[0]["content"]


TEMPLATES: dict[str, ChatTemplate] = {
    "r1_zero": R1ZeroTemplate("r1_zero"),
    "r1": R1Template("r1", generation_prefix="<think>\n"),
    "chatml": ChatMLTemplate("chatml"),
    "plain": PlainTemplate("plain"),
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r} (data.chat_template): use one of "
                         f"{sorted(TEMPLATES)}") from None


def render_prompt(messages: Messages, template: str = "r1") -> str:
    return get_template(template).prompt(messages)
