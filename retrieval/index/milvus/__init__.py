"""The Milvus backend: an index whose vectors, metadata and normalisers live in Milvus.

Owns the collections' layout and the state and lock rows (`collections`), the connection
(`client`, with `guard`: pymilvus errors as one line), the one-writer lock (`lock`),
``--where`` as Milvus filter expressions (`where`), the query layer's view of an
index (`space`) and every write (`writer`). The rest of the engine enters through `backend`
(build, open for queries, rollback), `changes` (add, remove, compact) and `checks` (verify).

May import `retrieval.errors`, `scoring/`, `corpus/`, `model/` and the rest of `index/`;
pymilvus is imported only in this package, and only when an index uses this backend.
"""
