"""Export formats and the output folder. Each format (fake_quant, int8, compressed_tensors)
registers by name in EXPORT_FORMATS, declares what it can write (`Writes`) and reads the
backend's uniform `QuantizedLinear`s, never a backend's module class; folder.py writes and loads
the folder around it."""
