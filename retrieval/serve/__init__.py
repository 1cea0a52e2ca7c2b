"""Serving: the HTTP API and search page (`app`, FastAPI + uvicorn, page files in `static/`) and
contact sheets of results (`sheets`). Imports `query` and the layers below it.
"""
