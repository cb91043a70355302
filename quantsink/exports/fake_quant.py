"""The `fake-quant` export: the quantized modules' own state. For the fake backend, float
weights (already quantize-dequantized) beside their scales and zero points, for research; for
the others, their layers as they hold them (torchao and quanto: int8 data and scales)."""
from __future__ import annotations

from quantsink.exports.base import ExportFormat
from quantsink.registry import EXPORT_FORMATS

FAKE_QUANT = EXPORT_FORMATS.register("fake-quant")(ExportFormat("fake-quant"))
