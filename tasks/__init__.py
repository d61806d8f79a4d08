"""Thin Prefect tasks over bevfusion_ptq library functions."""
