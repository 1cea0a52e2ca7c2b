"""Measurement: Recall@K of a model or a built index (`bench`), every query-layer strategy
scored over whole embedding matrices (`strategies`), and the table, JSON, Markdown and plot
outputs (`report`). Imports `query`, `index`, `model`, `corpus` and the layers below them.
"""
