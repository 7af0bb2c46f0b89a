"""Spectral surgery: streamed SVD spectra, intruder dimensions, and rescaling them into a repaired checkpoint."""
