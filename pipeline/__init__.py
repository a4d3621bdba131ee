"""Preprocessing: inputs -> foreground / background / pose triplets in Parquet."""
