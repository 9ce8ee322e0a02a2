#!/usr/bin/python3
"""Discovers the portfleet API through gRPC server reflection, knowing nothing
of portfleet's .proto files, and calls GetStatus.

Usage: api_reflection.py unix:///path/to/api.sock

Prints the services the server lists, then GetStatus as text format, and
exits 0. Debian's python3-grpcio has no reflection module, so the reflection
protocol (grpc.reflection.v1alpha, from grpc's reflection.proto) is compiled
here with grpc_tools.protoc.
"""
import importlib
import os
import sys
import tempfile

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf import text_format

REFLECTION_PROTO = """
syntax = "proto3";
package grpc.reflection.v1alpha;
service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest)
      returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    ExtensionRequest file_containing_extension = 5;
    string all_extension_numbers_of_type = 6;
    string list_services = 7;
  }
}
message ExtensionRequest {
  string containing_type = 1;
  int32 extension_number = 2;
}
message ServerReflectionResponse {
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ExtensionNumberResponse all_extension_numbers_response = 5;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ExtensionNumberResponse {
  string base_type_name = 1;
  repeated int32 extension_number = 2;
}
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
message ErrorResponse {
  int32 error_code = 1;
  string error_message = 2;
}
"""

METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def compile_reflection(workdir):
    from grpc_tools import protoc
    path = os.path.join(workdir, "reflection.proto")
    with open(path, "w") as f:
        f.write(REFLECTION_PROTO)
    rc = protoc.main(["protoc", "-I" + workdir, "--python_out=" + workdir, path])
    if rc != 0:
        sys.exit("protoc failed on reflection.proto")
    sys.path.insert(0, workdir)
    return importlib.import_module("reflection_pb2")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    target = sys.argv[1]
    with tempfile.TemporaryDirectory() as workdir:
        r = compile_reflection(workdir)
        channel = grpc.insecure_channel(target)
        info = channel.stream_stream(
            METHOD,
            request_serializer=r.ServerReflectionRequest.SerializeToString,
            response_deserializer=r.ServerReflectionResponse.FromString)

        def ask(**kwargs):
            responses = list(info(iter([r.ServerReflectionRequest(**kwargs)]),
                                  timeout=10))
            resp = responses[0]
            if resp.HasField("error_response"):
                sys.exit("reflection error: " + resp.error_response.error_message)
            return resp

        services = [s.name for s in
                    ask(list_services="").list_services_response.service]
        for name in services:
            print("service", name)
        service_name = next(s for s in services if s.endswith(".FleetService"))

        # Every file that defines the service, with its dependencies.
        pool = descriptor_pool.DescriptorPool()
        files = {}
        pending = ask(file_containing_symbol=service_name) \
            .file_descriptor_response.file_descriptor_proto
        for raw in pending:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[fd.name] = fd
        missing = True
        while missing:
            missing = False
            for fd in list(files.values()):
                for dep in fd.dependency:
                    if dep not in files:
                        missing = True
                        for raw in ask(file_by_filename=dep) \
                                .file_descriptor_response.file_descriptor_proto:
                            d = descriptor_pb2.FileDescriptorProto.FromString(raw)
                            files[d.name] = d
        added = set()

        def add(name):
            if name in added:
                return
            for dep in files[name].dependency:
                add(dep)
            pool.Add(files[name])
            added.add(name)

        for name in files:
            add(name)

        service = pool.FindServiceByName(service_name)
        method = service.FindMethodByName("GetStatus")
        factory = message_factory.MessageFactory(pool)
        request_class = factory.GetPrototype(method.input_type)
        response_class = factory.GetPrototype(method.output_type)
        call = channel.unary_unary(
            "/%s/%s" % (service_name, method.name),
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString)
        status = call(request_class(), timeout=10)
        print("GetStatus", text_format.MessageToString(status, as_one_line=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
