"""Generated gRPC code for the twostage.v1 API."""
