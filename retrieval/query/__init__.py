"""Queries: `search` (`Searcher`: open an index, answer one request or a batch, resolve
results) over `ranking` (the query layer: candidates from each signal, fetched for a batch at
once, exact re-scoring, one fused ranking per strategy), `embed` (query terms -> vectors, a
batch per modality, through the LRU `cache`), `terms` (what a query and a request are),
`rerank`, and `demo`, the end-to-end tour of a build and its searches. Imports `index`,
`model`, `corpus` and the layers below them.
"""
