import pytest

from zephyr_ray.generate import finish_reason


@pytest.mark.parametrize(
    "prompt, generated, max_tokens, max_model_len, error, expected",
    [(10, 5, 64, 512, None, "stop"), (10, 64, 64, 512, None, "length"), (500, 12, 64, 512, None, "length"),
     (10, 0, 64, 512, "engine died", "error")],
)
def test_finish_reason_from_token_counts(prompt, generated, max_tokens, max_model_len, error, expected):
    assert finish_reason(prompt, generated, max_tokens, max_model_len, error) == expected
