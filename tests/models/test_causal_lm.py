"""Causal LM adapters: every supported layout, built tiny from its real config class, generates
through SinkQuantizedCache exactly as through transformers' own cache when nothing is
quantized, batches with left padding, and round-trips through a quantsink folder."""
import pytest
import torch
from huggingface_hub import constants as hub_constants
from transformers import DynamicCache

from quantsink.errors import ModelLoadError
from quantsink.kv.cache import SinkQuantizedCache
from quantsink.kv.scheme import KVCacheScheme
from quantsink.models import catalog, resolve, save_model
from quantsink.testing.tiny import TINY_CAUSAL_LMS, build_tiny_causal_lm

PROMPTS = ["Return the value of the attribute.\nIf it is", "The default is"]
NEW_TOKENS = 12


def greedy(model, inputs, cache) -> torch.Tensor:
    return model.generate(
        **inputs, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=model.config.pad_token_id
    )


@pytest.mark.parametrize("model_type", TINY_CAUSAL_LMS)
def test_bits_16_generates_exactly_the_tokens_of_the_default_cache(model_type):
    adapter = build_tiny_causal_lm(model_type)
    inputs = adapter.preprocess(PROMPTS)
    assert bool((inputs["attention_mask"][:, 0] == 0).any())  # the short prompt is left-padded
    expected = greedy(adapter.model, inputs, DynamicCache())
    cache = SinkQuantizedCache(KVCacheScheme(bits=16))
    cache.set_attention_mask(inputs["attention_mask"])
    assert torch.equal(greedy(adapter.model, inputs, cache), expected)
    assert expected.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TINY_CAUSAL_LMS)
def test_left_padded_rows_get_what_they_get_alone(model_type):
    """8-bit pre-RoPE keys: the cache un-rotates with each family's rotary embedding (GPT-NeoX's
    is partial) at each row's real-token positions, so padding changes nothing."""
    adapter = build_tiny_causal_lm(model_type)
    config = KVCacheScheme(bits=8, group_size=8, residual_length=0, keys={"pre_rope": True}, sinks={"method": "pfn", "num_sinks": 1})
    batch = adapter.preprocess(PROMPTS)
    cache = SinkQuantizedCache(config, rotary_embedding=adapter.rotary_embedding())
    cache.set_attention_mask(batch["attention_mask"])
    together = greedy(adapter.model, batch, cache)
    for row, prompt in enumerate(PROMPTS):
        alone_inputs = adapter.preprocess([prompt])
        alone = greedy(adapter.model, alone_inputs, SinkQuantizedCache(config, rotary_embedding=adapter.rotary_embedding()))
        padding = int((batch["attention_mask"][row] == 0).sum())
        assert torch.equal(together[row, padding:], alone[0]), (model_type, row)


@pytest.mark.parametrize("model_type", ["qwen3", "gpt_neox"])
def test_folder_round_trip_keeps_logits_and_tokenizer(model_type, tmp_path):
    adapter = build_tiny_causal_lm(model_type)
    inputs = adapter.preprocess(PROMPTS)
    save_model(adapter, tmp_path / "lm")
    loaded = resolve(str(tmp_path / "lm"))
    assert loaded.family == adapter.family
    assert torch.equal(loaded.preprocess(PROMPTS)["input_ids"], inputs["input_ids"])
    assert torch.equal(loaded.embed(inputs), adapter.embed(inputs))


def test_hf_folder_with_tokenizer_loads_as_its_family(tmp_path):
    adapter = build_tiny_causal_lm("mistral")
    adapter.model.save_pretrained(tmp_path / "hf")
    adapter.processor.save_pretrained(tmp_path / "hf")
    loaded = resolve(str(tmp_path / "hf"))
    assert loaded.family == "hf-llama" and type(loaded.model).__name__ == "MistralForCausalLM"
    inputs = loaded.preprocess(PROMPTS, max_length=5)
    assert inputs["input_ids"].shape == (2, 5)
    assert torch.equal(loaded.embed(inputs), adapter.embed(inputs))


def test_catalog_names_the_llms_of_the_issue():
    rows = {name: (spec, family) for name, spec, family, _ in catalog()}
    for name in ("llama-2-7b", "llama-3-8b", "llama-3.1-8b-instruct", "mistral-7b", "qwen2.5-0.5b", "qwen2.5-7b"):
        assert rows[name][1] == "hf-llama" and rows[name][0].startswith("hf:")
    assert rows["phi-3-mini"][1] == "hf-phi3" and rows["pythia-160m"][1] == "hf-gpt-neox"


def test_uncached_llm_fails_offline_with_a_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*pass a local folder"):
        resolve("qwen2.5-0.5b")
