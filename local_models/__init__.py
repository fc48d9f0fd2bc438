"""Local GGUF inference (llama-cpp-python in supervised worker processes).

Imports nothing from ``sidecar``. The catalog, worker and pool arrive with the local
inference issue; this package exists now so the layout is fixed.
"""
