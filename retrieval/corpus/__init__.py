"""Corpora: what a user's data is and how it is read, before any model sees it.

`records` (the `Record` contract), `readers` (folder, CSV, JSONL, COCO, Karpathy, Flickr8k, and
the one table of formats), `webdataset` (tar shards, streamed), `images` (safe decoding),
`filters` (metadata conditions and groups), `synthetic` (the generated shapes corpus). Imports
only `retrieval.errors`, `retrieval.files` and `retrieval.scoring`.
"""
