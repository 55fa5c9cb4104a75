"""A CRI ImageService client on Python grpcio (grpc-core), run by the integration
tests (tests/common/clients.rs) from a venv they create under target/.

Reads one spec from stdin and prints one JSON document, in the same shape as the
grpc-go client (tests/clients/go/main.go):

    {"target": "unix:///abs/path.sock", "descriptor_set": "/abs/api.pb",
     "image": "host/repo:tag", "auth": {"username": "u", "password": "p"},
     "steps": ["ImageFsInfo", "PullImage", ...], "timeout_seconds": 60,
     "channel_options": [["grpc.default_authority", "..."]]}

    -> {"client", "version", "protobuf_version", "target",
        "results": [{"rpc", "ok", "response" | "responses" | "code", "code_name",
                     "message"}]}

Messages come from the FileDescriptorSet that `protoc --include_imports
--descriptor_set_out` makes of proto/runtime/v1/api.proto, so no generated code is
needed. Responses are proto3 JSON with proto field names (as protojson's
UseProtoNames), so both clients' output compares field by field.
"""

import json
import sys

import grpc
from google.protobuf import __version__ as protobuf_version
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

SERVICE = "runtime.v1.ImageService"

# The sequence kubelet's image manager exercises, run when the spec names no steps.
DEFAULT_STEPS = [
    "ImageFsInfo",
    "PullImage",
    "ListImages",
    "ImageStatus",
    "StreamImages",
    "RemoveImage",
    "ImageStatus",
]


def load_service(path):
    with open(path, "rb") as f:
        descriptors = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for file in descriptors.file:
        pool.Add(file)
    return pool.FindServiceByName(SERVICE)


def message_class(descriptor):
    return message_factory.GetMessageClass(descriptor)


def request_fields(rpc, spec):
    image = {"image": spec["image"]}
    if rpc in ("ImageFsInfo", "ListImages", "StreamImages"):
        return {}
    if rpc == "PullImage":
        request = {"image": image}
        auth = spec.get("auth")
        if auth:
            request["auth"] = {"username": auth["username"], "password": auth["password"]}
        return request
    if rpc == "ImageStatus":
        return {"image": image, "verbose": True}
    if rpc == "RemoveImage":
        return {"image": image}
    raise SystemExit(f"cri_client.py: unknown step {rpc!r}")


def encode(message):
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def failure(error):
    # StatusCode values are (number, "name") pairs; the name is spelled as in
    # grpc-go's codes (Unimplemented, InvalidArgument, …) for readable diffs.
    number, _ = error.code().value
    name = "".join(part.capitalize() for part in error.code().name.split("_"))
    return {"ok": False, "code": number, "code_name": name, "message": error.details() or ""}


def call(channel, method, spec, timeout):
    request_class = message_class(method.input_type)
    response_class = message_class(method.output_type)
    request = json_format.ParseDict(request_fields(method.name, spec), request_class())
    path = f"/{SERVICE}/{method.name}"
    serialize = request_class.SerializeToString
    deserialize = response_class.FromString
    try:
        if method.server_streaming:
            stub = channel.unary_stream(
                path, request_serializer=serialize, response_deserializer=deserialize
            )
            return {"ok": True, "responses": [encode(r) for r in stub(request, timeout=timeout)]}
        stub = channel.unary_unary(
            path, request_serializer=serialize, response_deserializer=deserialize
        )
        return {"ok": True, "response": encode(stub(request, timeout=timeout))}
    except grpc.RpcError as error:
        return failure(error)


def main():
    spec = json.load(sys.stdin)
    service = load_service(spec["descriptor_set"])
    timeout = spec.get("timeout_seconds") or 60
    options = [tuple(option) for option in spec.get("channel_options", [])]
    results = []
    with grpc.insecure_channel(spec["target"], options=options) as channel:
        for rpc in spec.get("steps") or DEFAULT_STEPS:
            method = service.methods_by_name.get(rpc)
            if method is None:
                raise SystemExit(f"cri_client.py: {SERVICE} has no method {rpc}")
            results.append({"rpc": rpc, **call(channel, method, spec, timeout)})
    json.dump(
        {
            "client": "grpcio",
            "version": grpc.__version__,
            "protobuf_version": protobuf_version,
            "target": spec["target"],
            "results": results,
        },
        sys.stdout,
        indent=2,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
