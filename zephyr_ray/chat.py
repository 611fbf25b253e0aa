"""The Zephyr chat template, kept in one place.

Zephyr renders every turn as ``<|role|>\\n{content}</s>\\n`` and prompts the model with ``<|assistant|>\\n``.
The assistant's content *and its* ``</s>`` sit inside ``{% generation %}`` so that TRL's assistant-only loss
trains the model to stop (pad == eos in this template, so a plain collator would mask the stop token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
EOS_TOKEN = "</s>"
BOS_TOKEN = "<s>"
UNK_TOKEN = "<unk>"
GENERATION_PROMPT = "<|assistant|>\n"

ZEPHYR_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('zephyr chat template: unknown role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\n' -}}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)


def render_reference(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The template's output written out in plain Python: the specification the Jinja template is checked against."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}{EOS_TOKEN}\n" for m in messages)
    return text + (GENERATION_PROMPT if add_generation_prompt else "")


def check_chat_template(tokenizer: Any) -> None:
    """Raise ``ValueError`` unless ``tokenizer`` renders conversations exactly as Zephyr does."""
    conversation = [
        {"role": "system", "content": "You are a friendly chatbot."},
        {"role": "user", "content": "Hi!\nHow are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
        {"role": "user", "content": "Tell me a joke."},
    ]
    for add_generation_prompt in (False, True):
        got = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        want = render_reference(conversation, add_generation_prompt)
        if got != want:
            raise ValueError(
                f"chat template renders {got!r}, expected the Zephyr format {want!r} "
                f"(add_generation_prompt={add_generation_prompt})"
            )
    if tokenizer.eos_token != EOS_TOKEN:
        raise ValueError(f"tokenizer eos_token is {tokenizer.eos_token!r}, the Zephyr template needs {EOS_TOKEN!r}")
