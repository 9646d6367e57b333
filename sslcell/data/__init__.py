"""Data: readers and loaders for expression matrices and cell crops, gene programmes, synthetic data."""
