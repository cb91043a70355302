"""llm-compressor's rows of benchmarks/minilm_fidelity.py, run inside the sidecar venv that
script builds (benchmarks/requirements-llmcompressor.txt): llm-compressor cannot share a venv
with quantsink's pins.

    python llmcompressor_worker.py INPUTS.json OUTPUT.json

INPUTS.json (written by minilm_fidelity.py): the model folder, the calibration paragraphs as
token ids (unpadded, one list per paragraph), the holdout batches exactly as quantsink feeds
them (padded input_ids and attention_mask), the bit widths, and, for the hosted rows, the path
of quantsink's source. The worker quantizes fresh copies of all-MiniLM-L6-v2 with oneshot and
writes each row's holdout embeddings (mean-pooled, normalised, as quantsink embeds) to
EMBEDDINGS.safetensors beside OUTPUT.json, which names them; minilm_fidelity.py measures them
against its own full-precision embeddings, so both sides share the texts, the inputs and the
metric. The worker's own full-precision embeddings come back too, as a check that the two
venvs run the same model.

Rows per bit width: per-tensor static inputs (llm-compressor's default min-max observer),
symmetric and asymmetric; SmoothQuant then static (strength 0.8, the mapping below); GPTQ
static; and quantsink's sink-tokens hosted as an llm-compressor modifier, alone and after
SmoothQuant (`SinkTokensModifier`, from quantsink's source: quantsink's own requirements do
not install here). SmoothQuant runs as its own oneshot before the quantizing one, so that the
quantization observers see smoothed inputs (in one basic-pipeline oneshot they calibrate on the
same pass that SmoothQuant measures, before it smooths).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import save_file
from transformers import BertModel

import llmcompressor
import compressed_tensors
import transformers
from llmcompressor import oneshot
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform import SmoothQuantModifier

# post-LN BERT has one function-preserving smoothing pair: value -> attention.output.dense
# (llm-compressor has no BertModel mapping; its default falls back to Llama names and smooths nothing)
BERT_SMOOTHQUANT = [[["re:.*attention.output.dense$"], "re:.*attention.self.value$"]]


class SinkTokensModifier(Modifier):
    """quantsink's sink-tokens as an llm-compressor modifier: on initialize it profiles the
    outlier tokens on the calibration set and installs its hooks, which keep those rows out of
    every observer llm-compressor attaches afterwards (process-wide pre-hooks run before a
    module's own) and compute them in float at inference. After oneshot the Linears keep float
    weights (compressed-tensors fake-quantizes them in each forward), so the outlier rows use the
    float weight, not the quantized one as quantsink's own backends do."""

    model_folder: str  # its tokenizer names the outlier tokens in the profile
    outlier_ratio: float = 5.0

    def on_initialize(self, state, **kwargs) -> bool:
        from quantsink.methods.sink_tokens import SinkTokensOptions, install, profile_outliers
        from quantsink.models.hf import HFBertTextAdapter

        adapter = HFBertTextAdapter.from_module(state.model, processor=HFBertTextAdapter.load_processor(Path(self.model_folder)))
        linears = {name: module for name, module in state.model.named_modules() if isinstance(module, torch.nn.Linear)}
        batches = [{key: value for key, value in batch.items() if key in ("input_ids", "attention_mask")} for batch in state.data.calib]
        profile = profile_outliers(adapter, linears, batches, SinkTokensOptions(outlier_ratio=self.outlier_ratio), progress=False)
        install(adapter, profile)
        return True


def scheme(weights: int, inputs: int, symmetric: bool = True) -> dict[str, Any]:
    return {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": weights, "type": "int", "symmetric": True, "strategy": "channel"},
        "input_activations": {"num_bits": inputs, "type": "int", "symmetric": symmetric, "strategy": "tensor", "dynamic": False},
    }}


@torch.no_grad()
def embed(model: BertModel, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    outputs = []
    for inputs in batches:
        hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        outputs.append(F.normalize((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9), p=2, dim=1))
    return torch.cat(outputs)


def main() -> None:
    inputs_path, output_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(inputs_path.read_text())
    if spec.get("quantsink_source"):
        sys.path.insert(0, spec["quantsink_source"])
    torch.manual_seed(0)
    full = BertModel.from_pretrained(spec["model"], add_pooling_layer=False, dtype=torch.float32).eval()
    dataset = Dataset.from_dict({"input_ids": spec["calibration"], "attention_mask": [[1] * len(ids) for ids in spec["calibration"]]})
    holdout = [{key: torch.tensor(value) for key, value in batch.items()} for batch in spec["holdout"]]
    samples, seq_len = len(spec["calibration"]), spec["seq_len"]

    def run(model: BertModel, recipe: list) -> None:
        oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=samples, max_seq_length=seq_len, pipeline="basic")

    def smoothed() -> BertModel:
        model = copy.deepcopy(full)
        run(model, [SmoothQuantModifier(smoothing_strength=0.8, mappings=BERT_SMOOTHQUANT)])
        return model

    embeddings = {"fp32": embed(full, holdout)}
    rows = []
    for weights, inputs in spec["bits"]:
        bits = f"W{weights}A{inputs}"
        recipes = {
            "static": (lambda: copy.deepcopy(full), [QuantizationModifier(config_groups=scheme(weights, inputs))]),
            "static asym": (lambda: copy.deepcopy(full), [QuantizationModifier(config_groups=scheme(weights, inputs, symmetric=False))]),
            "SmoothQuant + static": (smoothed, [QuantizationModifier(config_groups=scheme(weights, inputs))]),
            "GPTQ + static": (lambda: copy.deepcopy(full), [GPTQModifier(config_groups=scheme(weights, inputs))]),
        }
        if spec.get("quantsink_source"):
            recipes["static + quantsink sink-tokens modifier"] = (
                lambda: copy.deepcopy(full), [SinkTokensModifier(model_folder=spec["model"]), QuantizationModifier(config_groups=scheme(weights, inputs))])
            recipes["SmoothQuant + static + quantsink sink-tokens modifier"] = (
                smoothed, [SinkTokensModifier(model_folder=spec["model"]), QuantizationModifier(config_groups=scheme(weights, inputs))])
        for label, (start, recipe) in recipes.items():
            model = start()
            run(model, recipe)
            key = f"{bits} {label}"
            embeddings[key] = embed(model, holdout)
            if spec.get("quantsink_source"):  # sink-tokens' hooks are process-wide: off with the model
                from quantsink.models.handles import installed

                for handles in installed(model).values():
                    handles.remove()
            rows.append({"key": key, "bits": bits, "label": label})
            print(f"llmcompressor_worker: {key} done", file=sys.stderr, flush=True)
    weights_file = output_path.with_name("embeddings.safetensors")
    save_file({key: value.contiguous() for key, value in embeddings.items()}, str(weights_file))
    output_path.write_text(json.dumps({
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "rows": rows,
        "embeddings": str(weights_file),
    }))


if __name__ == "__main__":
    main()
