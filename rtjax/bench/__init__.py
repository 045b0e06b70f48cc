"""Measurement: latency percentiles of compiled serving functions."""
