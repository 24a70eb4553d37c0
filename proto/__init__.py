"""Protobuf and gRPC modules generated from ps.proto by scripts/gen_proto.py."""
