"""Generated gRPC stubs for the lossd.v1 proto package (see scripts/gen_protos.sh)."""
