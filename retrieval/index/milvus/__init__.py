"""The Milvus backend: an index whose vectors, metadata and normalisers live in Milvus.

Owns the collections' layout (`collections`), the connection (`client`), `--where` as Milvus
filter expressions (`where`), the query layer's view of an index (`space`) and every write
(`writer`: build, add, remove, upsert, compact, the cross-machine lock). It may import
`retrieval.errors`, `retrieval.files`, `scoring/`, `corpus/`, `model/` and the rest of `index/`;
pymilvus is imported only here, and only when an index uses this backend.
"""
