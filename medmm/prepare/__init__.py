"""Every ``medmm prepare`` command that turns raw data into what training reads: one module each.

``vqa`` (image question files), ``dicom`` (DICOM studies -> webdataset shards), ``wsi`` (whole-slide images ->
tiles or features), ``molecules`` (SMILES CSVs), ``genomics`` (DNA TSVs, VCF variants), ``text`` (corpora for
continued pre-training, with data selection), ``instructions`` (Alpaca/ShareGPT/PromptCBLUE), ``preferences``
(preference pairs). ``common`` holds the split and the outputs they share; ``parts`` the
``--num-shards`` parts and ``medmm prepare merge``. Runtime datasets (``medmm.data``) never
import this package; the readers both use live in ``medmm.io``.
"""
