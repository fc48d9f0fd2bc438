"""The gRPC front end (``protos/sidecar/v1/sidecar.proto``, service ``sidecar.v1.Sidecar``).

    server.py       GrpcServer: grpc's sync server, health and reflection, start/drain/stop
    bridge.py       the sync server's handlers: the servicer's coroutines run on the loop
    servicer.py     SidecarServicer: metadata, deadlines, errors -> status codes, the gateway
    translation.py  proto <-> the OpenAI shapes the gateway speaks
    v1/             code generated from the .proto by scripts/gen_protos.py (do not edit)

Only this package imports grpc; importing it starts nothing.
"""
