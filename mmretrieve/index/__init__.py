"""Indexes behind ``mmretrieve index`` and ``mmretrieve search``.

The vector-index layer is ``backends``: ``create_index``, ``load_index``, ``choose_index_type``
and the ``flat``, ``hnsw`` and ``ivfpq`` kinds; the rest of the package scans, stores and
searches collections with it. Importing this package imports neither faiss nor the backends;
faiss is imported once, through ``faiss_lib``, when an index is first built.
"""
