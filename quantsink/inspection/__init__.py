"""`quantsink inspect`: where the sink tokens and massive activations of a model are, which
layers are sensitive to quantization, and the recipe that follows from it.

    import quantsink
    inspection = quantsink.inspect("sink-lm", "bundled")   # -> Inspection
    inspection.save("out/inspect-sink-lm")                 # inspect.json, .md, .html, PNGs, recommended.yaml
    recipe = inspection.recommend()                        # a quantsink.Recipe

One module per concept: collect (the streaming hooks of the inspection pass), sensitivity (one
layer at a time, weights and activations, and the KV cache of a causal LM), recommend (the
recipe and the measured reason for each of its choices), figures (matplotlib, drawn from plain
data) and report (inspect.md, inspect.html, and the report.md `quantsink quantize` writes);
run composes them. The package is not called `inspect` so that `quantsink.inspect` stays the
function once the package is imported."""
