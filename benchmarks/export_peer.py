"""Does clip-retrieval read `retrieval embeddings`' export? Its own `index` command (autofaiss)
builds indexes from the exported folder, and they answer as the engine does.

coco-mini built with effnet-minilm, exported in clip-retrieval's layout, indexed by
clip-retrieval (its venv, as in build_speed.py), then 20 caption queries against both.

    python3 -m venv /tmp/cr-venv
    /tmp/cr-venv/bin/pip install 'setuptools<70' clip-retrieval torch torchvision
    .venv/bin/python benchmarks/export_peer.py --clip-retrieval /tmp/cr-venv/bin/clip-retrieval
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import faiss
import pyarrow.parquet as pq
from machine import describe

from retrieval.index.build import build
from retrieval.index.config import BuildConfig, ExportConfig
from retrieval.index.export import export
from retrieval.model.spec import ModelSpec
from retrieval.query.search import Query, Searcher

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip-retrieval", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = BuildConfig(model=ModelSpec("effnet-minilm"), progress=False)
        build(COCO_MINI / "captions.json", "cm", config, tmp / "ix")
        export("cm", tmp / "out", ExportConfig(), tmp / "ix")
        subprocess.run(
            [args.clip_retrieval, "index", "--embeddings_folder", str(tmp / "out"),
             "--index_folder", str(tmp / "cr")],
            check=True, capture_output=True,
        )  # fmt: skip
        theirs = faiss.read_index(str(tmp / "cr" / "image.index"))
        meta = pq.read_table(tmp / "out" / "metadata" / "metadata_0.parquet").to_pylist()
        records = json.loads((COCO_MINI / "captions.json").read_text())
        texts = [r["captions"][0] for r in records[:20]]
        same = 0
        with Searcher.open("cm", tmp / "ix") as s:
            for text in texts:
                ours = [r["id"] for r in s.search(Query(text=text), k=10)["results"]]
                _, rows = theirs.search(s.encoder.encode_texts([text]), 10)
                same += ours == [meta[i]["id"] for i in rows[0]]
    report = {"machine": describe(), "queries": len(texts), "identical_top10": same}
    print(json.dumps(report, indent=2))
    out = Path(__file__).parent / "results" / "export_peer.json"
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
