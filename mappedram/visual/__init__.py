"""Seeing snapshots: diff of two files, layout and population pictures, an HTML report."""
