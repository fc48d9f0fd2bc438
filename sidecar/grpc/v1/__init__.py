"""Generated from ``protos/sidecar/v1/sidecar.proto`` by ``scripts/gen_protos.py``; do not
edit (``make protos`` regenerates, and a test checks that these files match the .proto)."""
