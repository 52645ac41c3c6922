"""Sinusoidal absolute encodings: tables, add_sinusoidal(_), concat_sinusoidal."""
