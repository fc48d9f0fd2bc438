"""The OpenAI-compatible HTTP front end (Litestar).

    app.py       create_app: the routes over the gateway's surface, the error envelope
    sse.py       a stream's events as server-sent events (frames, cost comment, [DONE])
    protocol.py  uvicorn's httptools protocol with header caps
    openapi.py   the /openapi.json document
"""
