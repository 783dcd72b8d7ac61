"""Generated gRPC stubs for the clipsearch.v1 API (see protos/clipsearch/v1)."""
