"""Serving: the HTTP API and search page (`app`, FastAPI + uvicorn, page files in `static/`),
dynamic batching of its searches (`batching`: one worker answers the requests that arrive
together with `Searcher.search_many`), its limits and defaults (`config`) and contact sheets
of results (`sheets`). Imports `query` and the layers below it.
"""
