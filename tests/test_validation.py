"""The argument checks: what each takes, and messages naming the argument, the valid values and what was given."""

from __future__ import annotations

import pytest
import torch

from lp_callbacks import DistillationCallback
from lp_callbacks.harness.models import _resolve_dtype
from lp_callbacks.validation import DTYPE_NAMES, check_dtype


@pytest.mark.parametrize(
    "value, expected",
    [("bfloat16", torch.bfloat16), ("float64", torch.float64), ("half", torch.float16), (torch.float16, torch.float16)],
    ids=["name", "float64", "torch-alias", "dtype"],
)
def test_check_dtype_takes_a_floating_dtype_or_its_name(value, expected):
    assert check_dtype("dtype", value) is expected
    assert [check_dtype("dtype", name) for name in DTYPE_NAMES] == [getattr(torch, n) for n in DTYPE_NAMES]


@pytest.mark.parametrize("value", ["int8", torch.int64, torch.complex64, "Tensor", "", 16], ids=str)
def test_check_dtype_refuses_what_is_not_a_floating_dtype(value):
    with pytest.raises(ValueError) as error:
        check_dtype("x", value)
    names = "float32, bfloat16, float16, float64"
    assert str(error.value) == f"`x` must be a floating torch.dtype or its name ({names}), got {value!r}."


def test_check_dtype_none_only_when_allowed():
    assert check_dtype("x", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"float64\), got None\.$"):
        check_dtype("x", None)
    with pytest.raises(ValueError, match=r"float64\) or None, got 'int8'\.$"):
        check_dtype("x", "int8", allow_none=True)


def test_the_harness_and_the_distiller_read_dtypes_by_the_same_rule():
    for value in (*DTYPE_NAMES, "half", torch.bfloat16):
        expected = check_dtype("d", value)
        assert DistillationCallback(teacher_dtype=value).teacher_dtype is _resolve_dtype(value) is expected
    assert _resolve_dtype(None) is torch.float32 and DistillationCallback().teacher_dtype is None
    for value in ("int8", torch.int8):
        for build in (lambda v: DistillationCallback(teacher_dtype=v), _resolve_dtype):
            with pytest.raises(ValueError, match="must be a floating torch.dtype"):
                build(value)
