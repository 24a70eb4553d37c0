"""Client retries: only UNAVAILABLE, bounded, jittered (STYLE §6)."""

from __future__ import annotations

import random

import grpc
import pytest

from tether.retry import RetryPolicy, with_retry


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def flaky(failures: list[grpc.StatusCode], result="ok"):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= len(failures):
            raise FakeRpcError(failures[len(calls) - 1])
        return result

    return call, calls


FAST = RetryPolicy(attempts=4, initial_s=0.0001, max_s=0.001)


def test_unavailable_is_retried_until_success():
    call, calls = flaky([grpc.StatusCode.UNAVAILABLE] * 3)
    assert with_retry(call, FAST, random.Random(0)) == "ok"
    assert len(calls) == 4


def test_retries_are_bounded():
    call, calls = flaky([grpc.StatusCode.UNAVAILABLE] * 10)
    with pytest.raises(FakeRpcError):
        with_retry(call, FAST, random.Random(0))
    assert len(calls) == FAST.attempts


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED],
)
def test_other_codes_are_not_retried(code):
    call, calls = flaky([code])
    with pytest.raises(FakeRpcError):
        with_retry(call, FAST, random.Random(0))
    assert len(calls) == 1
