// The sidecar's gRPC service from grpc-js (Node's official gRPC library), as an internal Node
// service would call it: protos/sidecar/v1/sidecar.proto loaded at run time with
// @grpc/proto-loader, an insecure channel to the sidecar on loopback. Run by
// tests/e2e/test_grpc_js.py:
//
//   node grpc.mjs ADDRESS KEY CASE [OPTIONS_JSON]
//
// ADDRESS is host:port. KEY is sent as "authorization: Bearer KEY" ("" sends no key). CASE is
// the method to call: Chat, ChatStream, Embed or ListModels. OPTIONS_JSON (all optional):
//   request      fields merged over the default request (model "single", one user message
//                "hi"); field names as in the .proto (keepCase), enums by name
//   timeout_ms   the call's deadline (default 10000)
//   request_id   sent as x-request-id
//   auth         "x-api-key" sends the key as x-api-key instead of authorization
//   cancel_after ChatStream: cancel the call once this many chunks arrived
//   then_chat    after the call, make one default Chat (10 s deadline) on the same client
//                (channel) and report it under "then"
//
// Prints one JSON object: {code, code_name, details, initial, trailers, rich, response |
// messages, elapsed_ms[, then]}; metadata values that are binary (-bin) are base64, and
// grpc-status-details-bin is decoded into rich (google.rpc.Status with ErrorInfo/RetryInfo).
// Exits 0 whatever status the call ended with; 1 only when this script itself failed.
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [address, key, method, optionsJson] = process.argv.slice(2);
const options = optionsJson ? JSON.parse(optionsJson) : {};
const LOADER = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

const protos = fileURLToPath(new URL("../../../protos/", import.meta.url));
const definition = protoLoader.loadSync("sidecar/v1/sidecar.proto", {
  ...LOADER, includeDirs: [protos],
});
const Sidecar = grpc.loadPackageDefinition(definition).sidecar.v1.Sidecar;

// The rich status (google.rpc.Status and the details the sidecar packs), decoded with
// proto-loader's own deserializers: a service whose methods take each message type.
const rich = protoLoader.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } },
            Duration: { fields: { seconds: { type: "int64", id: 1 }, nanos: { type: "int32", id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
            RetryInfo: { fields: { retry_delay: { type: "google.protobuf.Duration", id: 1 } } },
            Decode: {
              methods: Object.fromEntries(["Status", "ErrorInfo", "RetryInfo"].map(
                (t) => [t, { requestType: t, responseType: t }])),
            },
          },
        },
      },
    },
  },
}, LOADER)["google.rpc.Decode"];

function decodeStatus(buffer) {
  const status = rich.Status.responseDeserialize(buffer);
  const details = status.details.map((any) => {
    const type = any.type_url.split("/").pop();
    const decode = { "google.rpc.ErrorInfo": rich.ErrorInfo, "google.rpc.RetryInfo": rich.RetryInfo }[type];
    return { type, ...(decode ? decode.responseDeserialize(any.value) : {}) };
  });
  return { code: status.code, message: status.message, details };
}

function plain(metadata) {
  if (!metadata) return null;
  const out = {};
  for (const [k, v] of Object.entries(metadata.getMap())) {
    out[k] = Buffer.isBuffer(v) ? v.toString("base64") : v;
  }
  return out;
}

const codeName = Object.fromEntries(Object.entries(grpc.status).map(([name, n]) => [n, name]));

function report(status, initial, started) {
  const details = status.metadata?.get("grpc-status-details-bin") ?? [];
  return {
    code: status.code,
    code_name: codeName[status.code],
    details: status.details,
    initial: plain(initial),
    trailers: plain(status.metadata),
    rich: details.length ? decodeStatus(details[0]) : null,
    elapsed_ms: Date.now() - started,
  };
}

function callOptions(timeoutMs) {
  const metadata = new grpc.Metadata();
  if (key) {
    if (options.auth === "x-api-key") metadata.set("x-api-key", key);
    else metadata.set("authorization", `Bearer ${key}`);
  }
  if (options.request_id) metadata.set("x-request-id", options.request_id);
  return [metadata, { deadline: Date.now() + timeoutMs }];
}

function unary(client, name, request, timeoutMs) {
  const started = Date.now();
  return new Promise((resolve) => {
    let response = null;
    let initial = null;
    const call = client[name](request, ...callOptions(timeoutMs), (err, reply) => {
      if (!err) response = reply;
    });
    call.on("metadata", (m) => { initial = m; });
    // Emitted right after the callback, with the trailers also when the call succeeded.
    call.on("status", (s) => resolve({ ...report(s, initial, started), response }));
  });
}

function stream(client, request, timeoutMs) {
  const started = Date.now();
  return new Promise((resolve) => {
    const messages = [];
    let initial = null;
    const call = client.ChatStream(request, ...callOptions(timeoutMs));
    call.on("metadata", (m) => { initial = m; });
    call.on("data", (chunk) => {
      messages.push(chunk);
      if (messages.length === options.cancel_after) call.cancel();
    });
    call.on("error", () => {});  // the status below reports it
    call.on("status", (s) => resolve({ ...report(s, initial, started), messages }));
  });
}

const DEFAULT_REQUEST = { model: "single", messages: [{ role: "ROLE_USER", content: "hi" }] };

async function run(client, name, request, timeoutMs = 10000) {
  switch (name) {
    case "Chat":
      return unary(client, "Chat", { ...DEFAULT_REQUEST, ...request }, timeoutMs);
    case "ChatStream":
      return stream(client, { ...DEFAULT_REQUEST, ...request }, timeoutMs);
    case "Embed":
      return unary(client, "Embed", { model: "embed", input: ["a"], ...request }, timeoutMs);
    case "ListModels":
      return unary(client, "ListModels", { ...request }, timeoutMs);
    default:
      throw new Error(`unknown case ${name}`);
  }
}

try {
  const client = new Sidecar(address, grpc.credentials.createInsecure());
  const result = await run(client, method, options.request ?? {}, options.timeout_ms);
  if (options.then_chat) result.then = await run(client, "Chat", {});
  client.close();
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(error?.stack ?? String(error));
  process.exit(1);
}
