"""What every gRPC service shares: server start-up (health, reflection, graceful drain), status mapping,
and conversions between engine objects and the specserve.v1 messages."""
