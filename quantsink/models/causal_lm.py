"""Adapters for transformers decoder-only language models (the hosts of KV-cache quantization).

Three layouts cover the families quantsink supports:

* `hf-llama`: Llama and its descendants whose modeling files are copies of Llama's: Mistral,
  Qwen2 and Qwen3 (Qwen3 adds a norm on each query and key head before RoPE). Separate q/k/v
  projections, gated MLP (`up_proj` -> `down_proj`), the decoder at `model`.
* `hf-phi3`: Phi-3, with fused `qkv_proj` and `gate_up_proj`.
* `hf-gpt-neox`: GPT-NeoX / Pythia, with fused `query_key_value`, partial rotary embedding
  (`rotary_pct`), parallel residual, the decoder at `gpt_neox`.

What the rest of quantsink needs from an LM beyond the encoder view: the residual stream of each
decoder block (KVSink's profiler reads it), how a block receives the KV cache (KVSink's predictor
hands the cache its sink scores from inside the forward), and the rotary embedding (pre-RoPE key
quantization un-rotates keys with it). Inputs are left-padded, as generation needs.

The keyword a layer takes the KV cache under is transformers' to change, and it does: `cache`
since 5.24 (`past_key_values` before; GPT-NeoX's layers say `layer_past`). It is read once from
each module's forward signature (`cache_keyword`), never guessed per call, and what relies on
it is probed after installing (quantsink.models.probe).
"""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import transformers
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import (
    GPTNeoXForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from quantsink.errors import UserError
from quantsink.models.base import ModelSource, register_adapter
from quantsink.models.hf import HFTextAdapter
from quantsink.models.probe import Tally

logger = logging.getLogger(__name__)

# (keys, values) -> (keys, values), on what an attention hands its KV cache
KVTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Every keyword a transformers release has handed a model, a decoder layer or an attention its
# KV cache under, newest first.
CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past")


def find_cache_keyword(module: nn.Module) -> str | None:
    """The keyword `module.forward` takes the KV cache under, from its signature, or None."""
    parameters = inspect.signature(module.forward).parameters
    return next((keyword for keyword in CACHE_KEYWORDS if keyword in parameters), None)


def cache_keyword(module: nn.Module) -> str:
    """`find_cache_keyword`, refusing a module that takes no cache under a known keyword."""
    keyword = find_cache_keyword(module)
    if keyword is not None:
        return keyword
    parameters = inspect.signature(module.forward).parameters
    raise UserError(
        f"{type(module).__name__}.forward (transformers {transformers.__version__}) takes the KV cache under none of "
        f"{', '.join(CACHE_KEYWORDS)} (its parameters: {', '.join(name for name in parameters if name != 'self')}): "
        "quantsink cannot hook its cache; install the tested versions (pip install -c constraints.txt -e .)"
    )


def cache_in_call(kwargs: dict[str, Any]) -> Any:
    """The cache a model-level call was given: callers may use any keyword transformers still
    accepts there (it maps deprecated ones itself), so each known one is looked up."""
    return next((kwargs[keyword] for keyword in CACHE_KEYWORDS if kwargs.get(keyword) is not None), None)


class HFCausalLMAdapter(HFTextAdapter):
    """A transformers `*ForCausalLM` whose decoder blocks are `<decoder_attr>.layers[i]`."""

    leading_tokens = 0  # a BOS token is an ordinary position: it may be a sink, and it is quantized
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "vocab.json")
    decoder_attr: ClassVar[str] = "model"
    fc1_path = "mlp.up_proj"
    fc2_path = "mlp.down_proj"

    def __init__(self, model: nn.Module, source: ModelSource, processor: Any):
        super().__init__(model, source, processor)
        if processor is not None:
            _prepare_for_batches(processor)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def architecture(cls, config: PretrainedConfig) -> tuple[type[PreTrainedModel], PretrainedConfig]:
        return cls.model_class(config), config

    # --- structure ----------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return getattr(self.model, self.decoder_attr)

    def _layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_key_value_heads(self) -> int:
        """Heads of the keys and values an attention hands its cache (fewer than the query heads
        under grouped-query attention)."""
        return self.model.config.num_key_value_heads

    def rotary_embedding(self) -> nn.Module:
        """The module that gives (cos, sin) for position ids, as the attention layers apply them."""
        return self.decoder.rotary_emb

    @functools.cached_property
    def call_cache_keyword(self) -> str:
        """The keyword the model's own forward (and `generate`) takes the KV cache under."""
        return cache_keyword(self.model)

    @functools.cached_property
    def _block_cache_keyword(self) -> str:
        return cache_keyword(self.blocks()[0])

    @functools.cached_property
    def _attention_cache_keyword(self) -> str:
        return cache_keyword(self.attention(0))

    def cache_of_call(self, kwargs: dict[str, Any]) -> Any:
        """The KV cache a decoder block was called with (its keyword arguments), or None."""
        return kwargs.get(self._block_cache_keyword)

    def probe_kv_cache(self, cache: Any) -> None:
        """A probe forward (two tokens) through `cache`."""
        self.model(**self.probe_inputs(), **{self.call_cache_keyword: cache}, use_cache=True)

    def transform_kv(self, block_index: int, transform: KVTransform, tally: Tally | None = None) -> RemovableHandle:
        """From now on, the keys and values that block `block_index`'s attention hands its cache
        (after RoPE, (batch, key/value heads, new tokens, head_dim)) go through
        `transform(keys, values) -> (keys, values)` first; without a cache, the attention uses
        what `transform` gives. `tally` records each run. `.remove()` the handle to undo it."""
        keyword = self._attention_cache_keyword

        def wrap_cache(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            return args, {**kwargs, keyword: _TransformingCache(kwargs.get(keyword), transform, tally)}

        return self.attention(block_index).register_forward_pre_hook(wrap_cache, with_kwargs=True)

    # --- data ---------------------------------------------------------------------------
    def preprocess(self, samples: list[Any], max_length: int | None = None) -> dict[str, torch.Tensor]:
        if not all(isinstance(sample, str) for sample in samples):
            raise UserError(f"{self.source.spec} is a language model: calibrate it on text (a .txt file or folder), not images")
        truncation = {"truncation": True, "max_length": max_length} if max_length is not None else {}
        encoded = self.tokenizer(list(samples), padding=True, return_tensors="pt", **truncation)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    @torch.no_grad()
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits averaged over each row's real tokens: every layer, lm_head included,
        shows in it."""
        logits = self.model(**inputs, use_cache=False).logits.float()
        mask = inputs["attention_mask"].unsqueeze(-1).to(logits.dtype)
        return (logits * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class _TransformingCache:
    """What an attention gets in place of its cache (None included): attentions only call
    `update(keys, values, layer_idx, ...)` on it, which transforms the keys and values and then
    hands them to the real cache, or back to the attention when there is none."""

    def __init__(self, cache: Any, transform: KVTransform, tally: Tally | None):
        self.cache, self.transform, self.tally = cache, transform, tally

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.transform(keys, values)
        if self.tally is not None:
            self.tally.ran()
        if self.cache is None:
            return keys, values
        return self.cache.update(keys, values, *args, **kwargs)


def _prepare_for_batches(tokenizer: Any) -> None:
    """Causal LMs generate from the right end of every row, so rows are padded on the left; many
    LM tokenizers have no pad token, and padding positions are masked, so EOS serves."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError("the tokenizer has neither a pad nor an EOS token: give it a pad_token to batch calibration text")
        tokenizer.pad_token = tokenizer.eos_token


@register_adapter
class HFLlamaAdapter(HFCausalLMAdapter):
    family = "hf-llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    model_classes = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)


@register_adapter
class HFPhi3Adapter(HFCausalLMAdapter):
    family = "hf-phi3"
    model_types = ("phi3",)
    model_classes = (Phi3ForCausalLM,)
    fc1_path = "mlp.gate_up_proj"


@register_adapter
class HFGPTNeoXAdapter(HFCausalLMAdapter):
    family = "hf-gpt-neox"
    model_types = ("gpt_neox",)
    model_classes = (GPTNeoXForCausalLM,)
    decoder_attr = "gpt_neox"
    attention_path = "attention"
    fc1_path = "mlp.dense_h_to_4h"
    fc2_path = "mlp.dense_4h_to_h"

    @property
    def num_key_value_heads(self) -> int:
        return self.model.config.num_attention_heads  # no grouped-query attention, whatever the config holds
