"""What grpcio's sync server costs per unary call before any gateway work: a handler that
answers at once, plain (sync) and bridged (``sidecar.grpc.bridge``: an ``async def`` run on
the server's event loop, as the sidecar serves every call).

    python benchmarks/grpc_floor.py [--duration 3] [--rounds 3]

The server is this file run with ``--_serve MODE`` in a child pinned to core 0 (uvloop in
one thread, grpc's server with the sidecar's transport options in others). The client runs
here on core 1 and measures with ``benchmarks/grpc.py``'s ``measure`` (grpc.aio, one
channel, one call at a time with a deadline, a second's warm-up first). Reports the
server's CPU (user + system) per call, the modes alternated round by round, and the
medians. Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and benchmarks/grpc.py
# would shadow the grpc package: take the folder out and put the repository in.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
from concurrent import futures  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import psutil  # noqa: E402

from benchmarks.grpc import LOAD_CORE, SIDECAR_CORE, Result, can_pin, measure, pinned  # noqa: E402
from benchmarks.harness import log, running  # noqa: E402
from sidecar.grpc.bridge import bridged  # noqa: E402
from sidecar.grpc.server import TRANSPORT_OPTIONS  # noqa: E402
from sidecar.grpc.v1 import sidecar_pb2 as pb  # noqa: E402
from sidecar.grpc.v1 import sidecar_pb2_grpc  # noqa: E402

MODES = ("plain", "bridged")
READY = re.compile(r"serving on (\d+)")
SERVICE = "sidecar.v1.Sidecar"


def serve(mode: str) -> None:
    """Serve ListModels (an empty answer) until killed; prints the port."""
    import uvloop

    loop = uvloop.new_event_loop()

    async def answer_async(request: Any, context: Any) -> pb.ListModelsResponse:
        return pb.ListModelsResponse()

    def answer(request: Any, context: Any) -> pb.ListModelsResponse:
        return pb.ListModelsResponse()

    def handler(behaviour: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString)

    method = bridged(handler(answer_async), loop) if mode == "bridged" else handler(answer)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64),
                         options=TRANSPORT_OPTIONS, maximum_concurrent_rpcs=64)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"ListModels": method}),))
    server.add_registered_method_handlers(SERVICE, {"ListModels": method})
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"serving on {port}", flush=True)
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server.wait_for_termination()


async def one_client(port: int, server: psutil.Process, duration_s: float) -> Result:
    """One client calling ListModels for ``duration_s``, after a second's warm-up."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        request = pb.ListModelsRequest()

        def call() -> Any:
            return stub.ListModels(request, timeout=10)

        await measure([call], 1.0, server)
        return await measure([call], duration_s, server)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--_serve", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._serve:
        serve(args._serve)
        return 0
    pin = can_pin()
    if pin:
        os.sched_setaffinity(0, {LOAD_CORE})
    results: dict[str, list[Result]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            command = [*pinned(SIDECAR_CORE, pin), sys.executable, __file__, "--_serve", mode]
            with running(command, READY, f"the {mode} server", timeout_s=30) as (ready, proc):
                result = asyncio.run(one_client(int(ready.group(1)), psutil.Process(proc.pid),
                                                args.duration))
            log(f"round {r + 1} {mode}: {result.requests_per_s:,.0f} calls/s, "
                f"{result.sidecar_cpu_us:,.0f} µs/call")
            results[mode].append(result)
    print("| handler | calls/s (each round) | server CPU µs/call (each round) | median µs/call |")
    print("|---|---|---|---:|")
    for mode in MODES:
        rows = results[mode]
        print(f"| {mode} | " + ", ".join(f"{x.requests_per_s:,.0f}" for x in rows) + " | "
              + ", ".join(f"{x.sidecar_cpu_us:,.0f}" for x in rows) + " | "
              + f"{statistics.median(x.sidecar_cpu_us for x in rows):,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
