"""Quantization: declared rules, quantized modules, BN fusion, calibration."""
