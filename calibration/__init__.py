"""Bundled default calibration data (photographs and English prose), installed as quantsink._bundled."""
