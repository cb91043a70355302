"""Real int8 execution (the `int8` backend); the exports that carry integers are tested in
tests/exports/ (test_int8_export.py, test_compressed_tensors.py)."""
import pytest
import torch

from quantsink.errors import UserError
from quantsink.quantizers import kernels
from quantsink.quantizers.functional import quantize
from quantsink.quantizers.int8 import Int8Quantizer
from quantsink.quantizers.kernels import int8_matmul
from quantsink.registry import INT8_KERNELS

from int8_helpers import ACTIVATIONS, OperatorSpy, calibrated, check_int8_gives_the_fake_outputs, config, mlp


@pytest.mark.parametrize("activations", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
def test_int8_gives_the_fake_outputs_within_float_rounding(activations, weights):
    check_int8_gives_the_fake_outputs(config(weights={"granularity": weights}, activations=activations))



def test_the_product_runs_in_int8():
    kernel = kernels.chosen(torch.device("cpu"), 8)
    if kernel.name == "float":
        pytest.skip(f"no int8 kernel is exact here: {kernels.describe()['probe']}")
    model = calibrated(mlp(), Int8Quantizer(config()), torch.randn(8, 48))
    with torch.no_grad(), OperatorSpy() as spy:
        model(torch.randn(5, 48))
    assert len(spy.of(kernel)) == 2  # one integer product per layer, on the kernel chosen here
    if kernel.codes_dtype != torch.float32:  # fbgemm takes float codes and makes them uint8 itself
        assert all(dtypes[0] == kernel.codes_dtype for dtypes in spy.of(kernel))


@pytest.mark.parametrize("shape", [(1, 7, 5), (16, 8, 8), (17, 24, 9), (64, 96, 40)])
def test_int8_matmul_is_exact_for_any_shape(shape):
    verdict = kernels.measured(torch.device("cpu"), 8).probes["int-mm"]
    if verdict != kernels.EXACT:
        pytest.skip(f"torch._int_mm on this CPU: {verdict}")
    rows, inner, columns = shape
    a = torch.randint(-127, 128, (rows, inner), dtype=torch.int8)
    b = torch.randint(-127, 128, (columns, inner), dtype=torch.int8).t()
    assert torch.equal(int8_matmul(a, b), a.int() @ b.int())


@pytest.mark.parametrize("bits", [8, 7])
@pytest.mark.parametrize("kernel", INT8_KERNELS.names())
def test_input_codes_are_functional_quantize(kernel, bits):
    kernel = INT8_KERNELS.get(kernel)
    x = torch.randn(64, 32) * 3
    x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 1000.0])  # ties round to even, out of range clips
    scale = torch.tensor([[0.02]])
    expected = quantize(x, scale, torch.zeros(()), bits, symmetric=True) + kernel.shift(bits)
    codes = kernels.to_codes(x, scale, bits, kernel)
    assert codes.dtype == kernel.codes_dtype and torch.equal(codes.float(), expected)


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"weights": {"bits": 4}}, "quantization.weights.bits"),
        ({"weights": {"symmetric": False}}, "quantization.weights.symmetric"),
        ({"weights": {"granularity": "per_group", "group_size": 16}}, "quantization.weights.granularity"),
        ({"weights": None}, "quantization.weights"),
        ({"activations": {"bits": 6}}, "quantization.activations.bits"),
        ({"activations": {"symmetric": False}}, "quantization.activations.symmetric"),
    ],
)
def test_int8_refuses_what_it_cannot_run_when_constructed(fields, field):
    with pytest.raises(UserError) as error:
        Int8Quantizer(config(backend="int8", **fields))
    message = str(error.value)
    assert message.startswith(field + " ") and "\n" not in message and "backend fake" in message
