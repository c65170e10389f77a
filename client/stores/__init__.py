"""Where a memory bank's vectors can live besides an in-process faiss index.

`neco.client.stores.milvus`: a Milvus collection (Milvus Lite file or cluster), the `VectorStore`
of `neco.client.bank`. Each store imports its own client library only when opened.
"""
