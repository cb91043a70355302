"""Sink-aware methods (RegCache, KVSink) that plug into the pipeline; each registers in METHODS."""
