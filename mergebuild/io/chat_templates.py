"""Named chat templates (chatml, llama3, alpaca, mistral, exaone) and the rule for a template value."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# Written from the formats' published descriptions. Rendered by transformers, chatml and
# mistral give the same text as mergekit 0.1.5's templates of the same name; llama3, alpaca and
# exaone differ from mergekit's only in whitespace its copies add or drop (a newline after each
# llama3 turn, indentation inside exaone turns, no blank line before alpaca's generation
# prompt); tests/test_mergekit_scenarios.py checks both.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
ALPACA = (
    "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{{ (system | last).content | trim if system else '' }}{{ '\\n\\n' }}"
    "{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', "
    "'user_context': '### Input:'} %}"
    "{% for message in messages if message['role'] in headers %}"
    "{{ headers[message['role']] + '\\n' + message['content'] | trim }}"
    "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{ '\\n\\n### Response:\\n' }}{% endif %}"
)
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' and loop.first and system_message is defined %}"
    "{{ ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'user' %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}{% endif %}"
    "{% endfor %}"
)
EXAONE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}"
    "{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "alpaca": ALPACA,
    "mistral": MISTRAL,
    "exaone": EXAONE,
}
AUTO = "auto"  # the most common template among the parents


def is_jinja(value: str) -> bool:
    """Whether a chat_template value is a template itself (it has a Jinja tag)."""
    return "{{" in value or "{%" in value


def template_problem(value: object) -> str | None:
    """Why ``value`` cannot be a chat_template (None when it can): a name, auto, or Jinja."""
    if not isinstance(value, str):
        return f"'chat_template' must be a string, got {value!r}"
    if value == AUTO or value in NAMED_TEMPLATES or is_jinja(value):
        return None
    return f"unknown chat template {value!r}"


def expand_template(value: str, parent_templates: Iterable[str | None]) -> str | None:
    """The template text a chat_template value stands for.

    Args:
        value: a name, ``auto`` or a Jinja template.
        parent_templates: the parents' own templates (read for ``auto``; None where a
            parent has none).
    Returns:
        The Jinja text; None for ``auto`` when no parent has a template (nothing is set).
    """
    if value == AUTO:
        found = [t.strip() for t in parent_templates if t and t.strip()]
        # Counter keeps first-seen order among equal counts: ties go to the earliest parent.
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED_TEMPLATES.get(value, value)


__all__ = ["AUTO", "NAMED_TEMPLATES", "expand_template", "is_jinja", "template_problem"]
