"""The Zephyr chat template, kept in one place.

Zephyr renders every turn as ``<|role|>\\n{content}</s>\\n`` and prompts the model with ``<|assistant|>\\n``.
The assistant's content *and its* ``</s>`` sit inside ``{% generation %}`` so that TRL's assistant-only loss
trains the model to stop (pad == eos in this template, so a plain collator would mask the stop token).
"""

from __future__ import annotations

import functools
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


TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")


def template_text(value: str | None) -> str | None:
    """A recipe's ``chat_template`` as Jinja text: 'zephyr' is Zephyr's; None stays None (the model's own)."""
    return ZEPHYR_CHAT_TEMPLATE if value == "zephyr" else value


def shipped_chat_template(model: str, fetch: bool = True) -> tuple[bool, str | None]:
    """(known, template): the chat template a model ships, where transformers looks for one (``chat_template`` in
    tokenizer_config.json, chat_template.jinja, a processor's chat_template.json). ``known`` is False when the model
    cannot be read here (a hub id without ``fetch``, offline), and nothing is concluded."""
    import json
    from pathlib import Path

    from .data import is_hub_id

    directory = Path(model).expanduser()
    found: dict[str, Path] = {}
    if directory.is_dir():
        found = {name: directory / name for name in TEMPLATE_FILES if (directory / name).is_file()}
        if not (directory / "config.json").is_file() and not found:
            return False, None
    elif fetch and is_hub_id(model):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        for name in TEMPLATE_FILES:
            try:
                found[name] = Path(hf_hub_download(model, name))
            except EntryNotFoundError:
                continue
            except Exception:  # offline, gated, not a model: vLLM will say so when it loads the model
                return False, None
    else:
        return False, None
    try:
        if "chat_template.jinja" in found:
            return True, found["chat_template.jinja"].read_text(encoding="utf-8")
        for name in ("tokenizer_config.json", "chat_template.json"):
            if name in found:
                template = json.loads(found[name].read_text(encoding="utf-8")).get("chat_template")
                if isinstance(template, list):  # named templates: transformers uses "default"
                    template = next((t.get("template") for t in template if t.get("name") == "default"), None)
                if isinstance(template, str) and template.strip():
                    return True, template
    except (OSError, ValueError, AttributeError):
        return False, None
    return True, None


@functools.lru_cache(maxsize=16)
def tokenizer_of(model: str, trust_remote_code: bool = False) -> Any:
    """A model's tokenizer, loaded once per process (the driver asks for it per stage and per check)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)


def accepts_system_role(model: str, chat_template: str | None = None, trust_remote_code: bool = False) -> bool:
    """Whether ``model``'s template (or ``chat_template``) renders a system message: older Mistral-Instruct
    templates raise on one. Rendered with the model's tokenizer, as Ray's chat-template stage renders."""
    tokenizer = tokenizer_of(model, trust_remote_code)
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                      chat_template=template_text(chat_template), tokenize=False,
                                      add_generation_prompt=True)
    except Exception:  # jinja2's TemplateError from raise_exception, or any error the template's logic raises
        return False
    return True


def adds_bos(tokenizer: Any) -> bool:
    """Whether encoding text with special tokens puts a BOS first (Mistral's and Llama's tokenizers do)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def prompt_template(tokenizer: Any, chat_template: str | None = None) -> str | None:
    """The template every path renders with (training, Ray Data generation, evaluation, Serve): ``chat_template``
    (recipe value) or the tokenizer's own, led by ``{{ bos_token }}`` when the tokenizer adds a BOS and the template
    writes none (Zephyr's). Every path then encodes the rendered text *without* special tokens, as TRL and vLLM's
    chat API do, so a conversation has the same ids everywhere and one BOS where the model was pretrained with one.
    Idempotent: a template that already starts with the BOS is returned as it is."""
    template = template_text(chat_template) or tokenizer.chat_template
    if template is None or not adds_bos(tokenizer):
        return template
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    return template if rendered.startswith(tokenizer.bos_token) else "{{ bos_token }}" + template


def template_for(model: str, chat_template: str | None = None, trust_remote_code: bool = False) -> str | None:
    """``prompt_template`` for a model named by its directory or hub id (its tokenizer loaded once per process)."""
    return prompt_template(tokenizer_of(model, trust_remote_code), chat_template)


def prompt_token_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], template: str | None) -> list[int]:
    """A conversation's prompt ids: rendered with ``template`` (``prompt_template``), encoded without special
    tokens. Ends with the generation prompt after a user turn; after an assistant turn (a reply to score, or a
    prefill) the final message is continued, as Ray's chat-template stage does."""
    messages = [dict(m) for m in messages]
    open_reply = bool(messages) and messages[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=not open_reply, continue_final_message=open_reply)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
