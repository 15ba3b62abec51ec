"""The backend contract: the same assertions over every backend in CONTRACT_BUILDERS.

Each backend serves the classifier of tests/proxy/models.py; numpy is the oracle.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from proxy.core.errors import BadRequest, NotReady
from proxy.protocol.base import Backend, TensorSpec
from tests.proxy.backends.conftest import ContractCase
from tests.proxy.models import INPUT, LABEL, PROBS


def _check(case: ContractCase, x: np.ndarray, out: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(out[PROBS], case.weights.probs(x), rtol=1e-5, atol=1e-6)
    assert out[PROBS].dtype == np.float32
    np.testing.assert_array_equal(out[LABEL], case.weights.labels(x))
    assert out[LABEL].dtype == np.int64


def test_implements_the_backend_protocol(contract: ContractCase) -> None:
    assert isinstance(contract.backend, Backend)


def test_metadata_declares_names_datatypes_and_dynamic_batch(contract: ContractCase) -> None:
    meta = contract.backend.metadata
    n_f, n_c = contract.weights.n_features, contract.weights.n_classes
    assert meta.inputs == (TensorSpec(INPUT, "FP32", (-1, n_f)),)
    assert meta.outputs == (
        TensorSpec(PROBS, "FP32", (-1, n_c)),
        TensorSpec(LABEL, "INT64", (-1,)),
    )
    assert meta.name and meta.platform


def test_identity_names_kind_device_and_file_digest(contract: ContractCase) -> None:
    identity = contract.backend.identity
    assert identity.kind == contract.kind
    assert identity.device == "cpu"
    assert identity.name == contract.backend.metadata.name
    if contract.digest is not None:
        assert identity.digest == contract.digest
    else:
        assert len(identity.digest) == 64 and int(identity.digest, 16) >= 0


@pytest.mark.parametrize("rows", [1, 5, 33])
async def test_outputs_match_numpy(contract: ContractCase, rows: int) -> None:
    x = contract.weights.sample(rows, seed=rows)
    out = await contract.backend.infer({INPUT: x})
    assert set(out) == {PROBS, LABEL}
    assert out[PROBS].shape == (rows, contract.weights.n_classes)
    assert out[LABEL].shape == (rows,)
    _check(contract, x, out)


async def test_requested_outputs_only(contract: ContractCase) -> None:
    x = contract.weights.sample(3)
    out = await contract.backend.infer({INPUT: x}, outputs=[LABEL])
    assert list(out) == [LABEL]
    np.testing.assert_array_equal(out[LABEL], contract.weights.labels(x))


async def test_unknown_output_is_a_bad_request(contract: ContractCase) -> None:
    with pytest.raises(BadRequest, match="nope"):
        await contract.backend.infer({INPUT: contract.weights.sample(2)}, outputs=["nope"])


async def test_unknown_and_missing_inputs_are_bad_requests(contract: ContractCase) -> None:
    x = contract.weights.sample(2)
    with pytest.raises(BadRequest, match="extra"):
        await contract.backend.infer({INPUT: x, "extra": x})
    with pytest.raises(BadRequest, match=INPUT):
        await contract.backend.infer({})


async def test_wrong_feature_count_is_a_bad_request(contract: ContractCase) -> None:
    x = np.zeros((2, contract.weights.n_features + 1), np.float32)
    with pytest.raises(BadRequest, match="shape"):
        await contract.backend.infer({INPUT: x})
    with pytest.raises(BadRequest, match="shape"):
        await contract.backend.infer({INPUT: np.zeros(contract.weights.n_features, np.float32)})


async def test_integers_that_fit_exactly_are_cast(contract: ContractCase) -> None:
    x = np.arange(2 * contract.weights.n_features, dtype=np.int64).reshape(2, -1) - 3
    out = await contract.backend.infer({INPUT: x})
    _check(contract, x.astype(np.float32), out)


async def test_values_that_would_change_are_a_bad_request(contract: ContractCase) -> None:
    x = np.full((2, contract.weights.n_features), 0.1, np.float64)  # 0.1 is not an FP32
    with pytest.raises(BadRequest, match="FP32"):
        await contract.backend.infer({INPUT: x})
    big = np.full((1, contract.weights.n_features), 2**40 + 1, np.int64)
    with pytest.raises(BadRequest, match="FP32"):
        await contract.backend.infer({INPUT: big})


async def test_bytes_into_a_numeric_input_is_a_bad_request(contract: ContractCase) -> None:
    x = np.array([[b"a"] * contract.weights.n_features], dtype=object)
    with pytest.raises(BadRequest, match="BYTES"):
        await contract.backend.infer({INPUT: x})


async def test_concurrent_calls_each_get_their_own_rows(contract: ContractCase) -> None:
    xs = [contract.weights.sample(1 + i % 3, seed=100 + i) for i in range(12)]
    outs = await asyncio.gather(*(contract.backend.infer({INPUT: x}) for x in xs))
    for x, out in zip(xs, outs, strict=True):
        _check(contract, x, out)


async def test_event_loop_runs_while_the_model_runs(contract: ContractCase) -> None:
    """A heartbeat that yields every loop turn ticks during ``infer`` only if the model
    runs off the loop: a synchronous run would hold the loop until it returned."""
    ticks = 0
    stop = False

    async def heartbeat() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)
    x = contract.weights.sample(256)
    before = ticks
    out = await contract.backend.infer({INPUT: x})
    during = ticks - before
    stop = True
    await beat
    _check(contract, x, out)
    assert during >= 1


async def test_bad_requests_do_not_break_the_backend(contract: ContractCase) -> None:
    with pytest.raises(BadRequest):
        await contract.backend.infer({INPUT: np.zeros((1, 99), np.float32)})
    x = contract.weights.sample(4)
    _check(contract, x, await contract.backend.infer({INPUT: x}))


async def test_closed_backend_refuses_new_calls(contract: ContractCase) -> None:
    await contract.backend.aclose()
    with pytest.raises(NotReady):
        await contract.backend.infer({INPUT: contract.weights.sample(1)})
    await contract.backend.aclose()  # idempotent
