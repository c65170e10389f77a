"""The bank-store benchmark runs end to end on a tiny bank and writes a schema-conforming file."""

import json
from pathlib import Path

import bank_stores

from .test_results_schema import check_schema


def test_bank_stores_main_writes_the_common_schema(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bank_stores_cpu.json"
    argv = ["--n", "2000", "--clusters", "20", "--queries", "8", "--repeats", "1", "--nlist", "16", "--out", str(out)]
    assert bank_stores.main(argv) == 0
    document = json.loads(out.read_text())
    check_schema(document)
    assert document["benchmark"] == "bank_stores" and document["settings"]["n"] == 2000
    rows = {row["store"]: row for row in document["results"]}
    assert set(rows) == {"milvus_lite_flat", "faiss_flat", "faiss_ivf", "faiss_hnsw"}
    assert rows["faiss_flat"]["recall_at_30"] == 1.0 and rows["milvus_lite_flat"]["recall_at_30"] == 1.0  # both exact
    assert all(0 < row["recall_at_30"] <= 1 and row["query_batch_median_s"] > 0 for row in rows.values())
    assert document["machine"]["packages"]["pymilvus"] is not None
    assert "milvus_lite_flat" in capsys.readouterr().out  # the printed table
