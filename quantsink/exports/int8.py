"""The `int8` export: int8 weights and float scales (about a quarter of fp32), written as the
int8 backend's layers, so the folder loads into (and runs on) that backend whichever integer
backend quantized it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from quantsink import io
from quantsink.errors import UserError
from quantsink.exports.base import Artifact, ExportFormat, Writes, replace_layers
from quantsink.registry import EXPORT_FORMATS, QUANTIZERS


class Int8Export(ExportFormat):
    writes = Writes(integer_layers=True, loads_into="int8")

    def write(self, artifact: Artifact, folder: Path) -> dict[str, Any]:
        config = artifact.recipe.quantization
        problem = self.incompatibility(config)
        if problem is not None:
            raise UserError(problem)
        target = config.model_copy(update={"backend": self.writes.loads_into})
        runner = QUANTIZERS.get(target.backend)(target)
        linears = artifact.quantized_linears()
        io.save_tensors(replace_layers(artifact.model.state_dict(), {name: runner.linear_state(linear) for name, linear in linears.items()}),
                        folder / io.WEIGHTS)
        # the state `restore` of an integer backend takes: the names of its layers
        return {"backend": target.backend, "config": target.model_dump(mode="json"), "state": {"modules": sorted(linears)}}


INT8 = EXPORT_FORMATS.register("int8")(Int8Export("int8"))
