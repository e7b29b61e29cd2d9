"""Retrieval: documents -> BM25 (bm25s) + dense (faiss) indices fused by reciprocal rank, in one offline folder.

Layer: between ``model/`` and ``inference/`` (may import ``data``/``model``; ``inference`` and ``eval`` import it).

    medmm index build --source icd10cm --out runs/index/icd10cm
    python infer.py --checkpoint C --question "..." --rag runs/index/icd10cm --rag-top-k 3
    medmm eval normalisation --predictions P | --checkpoint C --data Q --index runs/index/icd10cm

Heavy dependencies (bm25s, faiss, scikit-learn) are imported when an index is built or loaded.
"""

from .fusion import reciprocal_rank_fusion
from .sources import Document, icd10cm_pairs, list_sources, register_source

__all__ = ["Document", "icd10cm_pairs", "list_sources", "reciprocal_rank_fusion", "register_source"]
