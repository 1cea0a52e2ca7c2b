"""Indexes: building, storing, changing and checking the on-disk index folder.

`vector_index` wraps FAISS (with `exact` and the packed C kernel `packed` for exact search,
`autoindex` choosing and tuning approximate ones); `store` is the LMDB metadata; `embeddings` the
stored vectors; `querybank` the build-time normalisers; `manifest` and `layout` the folder, its
commit mark and atomic publication; `build`, `lifecycle` (add, remove, compact) and `verify` the
operations. FAISS row ids and its -1 padding stay inside this package and the query layer.
Imports `model`, `corpus` and the layers below them.
"""
