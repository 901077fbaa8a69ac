"""The schema's keys as the command line sees them: each has a meaning for --help, accepts its own default,
and a wrong key or type is named with the fix."""

import pytest

from optkit.config.compose import GROUPS
from optkit.config.keys import check_override, closest_keys, schema_keys


def _as_override(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return "{}"
    return str(value)


def test_every_key_says_what_it_means():
    # the groups themselves are described by their dataclass's docstring
    blank = [path for path, key in schema_keys().items() if "." in path and not key.meaning.strip()]
    assert not blank, f"keys without a meaning (schema.setting(default, meaning)): {blank}"


@pytest.mark.parametrize("path", [p for p, k in schema_keys().items() if "." in p and not k.is_node])
def test_every_key_accepts_its_own_default(path):
    key = schema_keys()[path]
    if key.default == "":
        pytest.skip("an empty string is no override value")
    assert check_override(f"{path}={_as_override(key.default)}", GROUPS) is None


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.batchsize=2", "did you mean train.batch_size?"),
        ("bench.time_out=3", "did you mean bench.timeout_s?"),
        ("+data.seqlen=3", "'+' cannot add"),
        ("train.steps=ten", "train.steps expects an int, got 'ten'"),
        ("bench.peak_tflops=fast", "bench.peak_tflops expects a float or null"),
        ("model.hf_config.hidden_size=64", None),  # below a free-form mapping: Hydra's business
        ("+model.hf_config.rope_scaling={}", None),
        ("model=tiny_llama", None),
    ],
)
def test_overrides_are_checked_against_the_schema(override, expected):
    problem = check_override(override, GROUPS)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem


def test_closest_key_of_a_nested_typo():
    assert closest_keys("opt.kernel.rms_norm") == ["opt.kernels.rms_norm"]
