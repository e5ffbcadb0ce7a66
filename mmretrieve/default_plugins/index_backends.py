"""The built-in vector index backends (see ``mmretrieve.index.backends``)."""

from mmretrieve import hookimpl
from mmretrieve.specs import IndexBackendSpec


@hookimpl
def register_index_backends(register):
    register(IndexBackendSpec(name="flat", factory="mmretrieve.index.backends:FlatIndex", aliases=("exact",),
                              description="exact inner-product search over every vector (faiss IndexFlatIP)"))
    register(IndexBackendSpec(name="hnsw", factory="mmretrieve.index.backends:HNSWIndex",
                              description="HNSW graph: fast approximate search, vectors kept in memory"))
    register(IndexBackendSpec(name="ivfpq", factory="mmretrieve.index.backends:IVFPQIndex",
                              description="IVF over PQ codes, re-ranked exactly from vectors on disk: low memory"))
