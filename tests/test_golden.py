"""Golden losses (tests/golden/): every shipped model's first 20 losses and grad norms, on 1 process and on 2-process
FSDP, equal the recorded ones within a tolerance measured across CPU kernels (tests/golden/record.py: TOLERANCE)."""

import json

import pytest

from tests.golden.record import GOLDEN, MODELS, TOLERANCE, differences, record


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_losses_and_grad_norms_match_the_golden_file(model):
    golden = json.loads(GOLDEN.read_text())
    runs = record((model,))
    assert differences({model: golden[model]}, runs, TOLERANCE) == []


def test_the_comparison_sees_a_change_in_the_last_digits_it_is_asked_to():
    a = {"m": {"1proc": {"loss": [5.0, 4.0], "grad_norm": [1.0, 1.0]}}}
    b = {"m": {"1proc": {"loss": [5.0, 4.0 * (1 + 3 * TOLERANCE)], "grad_norm": [1.0, 1.0]}}}
    assert differences(a, b, TOLERANCE) == [f"m/1proc loss step 2: 4.0 against {4.0 * (1 + 3 * TOLERANCE)!r}"]
    assert differences(a, a, 0.0) == []
