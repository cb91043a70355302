"""Quantization backends: fake (simulated) first; each registers in QUANTIZERS."""
