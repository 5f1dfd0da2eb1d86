"""The retrieve stage: collections of passages with vectors, persisted, searched by FAISS."""
