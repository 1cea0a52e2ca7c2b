"""Pure math on arrays and tensors: Recall@K and ranks (`metrics`), score fusion (`fusion`),
near-duplicate folding of results (`dedup`).

The bottom layer: no models, indexes, stores or files. Shared by the layers above that score
things: the index build (querybank normalisers), the query layer, training validation and the
benchmarks. Imports nothing from the engine but `retrieval.errors`.
"""
