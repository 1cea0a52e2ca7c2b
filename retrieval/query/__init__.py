"""Queries: `search` (open an index, encode a query, resolve results) over `ranking` (the query
layer: candidates from each signal, exact re-scoring, one fused ranking per strategy), and
`demo`, the end-to-end tour of a build and its searches. Imports `index`, `model`, `corpus` and
the layers below them.
"""
