"""The wire shapes of the HTTP APIs the gateway speaks (one module per API): request models validated with
pydantic, response and stream-chunk bodies, error bodies. Pure: no I/O, no engine."""
