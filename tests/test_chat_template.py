import pytest

from zephyr_ray.chat import GENERATION_PROMPT, ZEPHYR_CHAT_TEMPLATE, check_chat_template, render_reference

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
]


def test_reference_rendering_is_the_zephyr_format():
    assert render_reference(CONVERSATION) == (
        "<|system|>\nYou are helpful.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
    )
    assert render_reference(CONVERSATION[:2], add_generation_prompt=True).endswith("<|user|>\nHi</s>\n<|assistant|>\n")
    assert GENERATION_PROMPT == "<|assistant|>\n"


@pytest.fixture(scope="module")
def tokenizer():
    from zephyr_ray.tiny import build_tokenizer

    return build_tokenizer()


def test_jinja_template_matches_reference(tokenizer):
    check_chat_template(tokenizer)
    multi_turn = CONVERSATION + [{"role": "user", "content": "Bye\nnow"}, {"role": "assistant", "content": "Bye."}]
    for messages in (CONVERSATION, CONVERSATION[1:], multi_turn):
        for gen in (False, True):
            assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
                render_reference(messages, gen)


def test_assistant_mask_covers_the_end_token(tokenizer):
    """The stop token must be a trained label in assistant-only loss: it sits inside {% generation %}."""
    out = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(trained) == "Hello!</s>"


def test_unknown_role_is_refused(tokenizer):
    with pytest.raises(Exception, match="unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_check_catches_a_different_template(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE.replace("'<|assistant|>\n'", "'<|assistant|>'")
    assert tokenizer.chat_template != original
    try:
        with pytest.raises(ValueError, match="expected the Zephyr format"):
            check_chat_template(tokenizer)
    finally:
        tokenizer.chat_template = original


def test_the_prompt_template_gives_one_bos_where_the_tokenizer_adds_one_and_none_elsewhere(tokenizer):
    """chat.prompt_template: Zephyr's template (no BOS in it) and a Mistral-style one (``{{ bos_token }}`` first)
    both give exactly one BOS with a BOS-adding tokenizer (like Mistral's), none with one that adds none; the naive
    encoding Ray's tokenize stage and vLLM's text path use (special tokens on) would double it."""
    from zephyr_ray.chat import adds_bos, prompt_template, prompt_token_ids
    from zephyr_ray.tiny import bos_adding

    with_bos = bos_adding(tokenizer)
    bos = tokenizer.bos_token_id
    prompt = CONVERSATION[:2]
    mistral_style = "{{ bos_token }}" + ZEPHYR_CHAT_TEMPLATE
    assert adds_bos(with_bos) and not adds_bos(tokenizer)
    for template in (ZEPHYR_CHAT_TEMPLATE, mistral_style):
        ids = prompt_token_ids(with_bos, prompt, prompt_template(with_bos, template))
        assert ids[0] == bos and ids.count(bos) == 1, ids
        once = prompt_template(with_bos, template)
        assert prompt_template(with_bos, once) == once  # a trained model's saved template is not prefixed again
    plain = prompt_token_ids(tokenizer, prompt, prompt_template(tokenizer, "zephyr"))
    assert bos not in plain and plain == prompt_token_ids(with_bos, prompt, prompt_template(with_bos, "zephyr"))[1:]
    naive = with_bos(with_bos.apply_chat_template(prompt, chat_template=mistral_style, tokenize=False,
                                                  add_generation_prompt=True))["input_ids"]
    assert naive[:2] == [bos, bos]
    # a reply to score (the reward model's input) continues the final message: no closing </s>, no new turn
    scored = prompt_token_ids(tokenizer, CONVERSATION, ZEPHYR_CHAT_TEMPLATE)
    assert tokenizer.decode(scored).endswith("<|assistant|>\nHello!")
