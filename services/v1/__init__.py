"""Generated gRPC stubs of protos/specserve/v1 (scripts/gen_protos.sh); do not edit."""
