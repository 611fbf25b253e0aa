import pytest

from zephyr_ray.generate import finish_reason


@pytest.mark.parametrize(
    "prompt, generated, max_tokens, max_model_len, error, expected",
    [(10, 5, 64, 512, None, "stop"), (10, 64, 64, 512, None, "length"), (500, 12, 64, 512, None, "length"),
     (10, 0, 64, 512, "engine died", "error")],
)
def test_finish_reason_from_token_counts(prompt, generated, max_tokens, max_model_len, error, expected):
    assert finish_reason(prompt, generated, max_tokens, max_model_len, error) == expected


def test_rows_carry_their_prompt_ids_and_a_template_that_refuses_a_row_is_named(tiny_models):
    """The processor's preprocess: the prompt ids of each row (the one prompt-token path); a conversation the
    model's template refuses (generator-1's raises on a system message) is an error naming the model and roles."""
    from zephyr_ray.config import Engine
    from zephyr_ray.generate import prompt_tokens_of

    messages = [{"role": "user", "content": "Hi"}]
    row = prompt_tokens_of(Engine(model=str(tiny_models["student"])))({"messages": messages, "prompt_id": "p1"})
    assert row["tokenized_prompt"][0] == 1 and row["messages"] == messages  # the student's BOS, columns kept
    refusing = prompt_tokens_of(Engine(model=str(tiny_models["generator-1"])))
    with pytest.raises(ValueError, match=r"generator-1: its chat template cannot render a conversation with roles "
                                         r"\['system', 'user'\] \(prompt_id p1\): System role not supported"):
        refusing({"messages": [{"role": "system", "content": "Be brief."}, *messages], "prompt_id": "p1"})
