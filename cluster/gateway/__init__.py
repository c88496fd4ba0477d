"""The HTTP gateway: the OpenAI (and Anthropic) protocols, the FastAPI app, tool-call parsing and the
Prometheus metrics. Runs in the gateway replica; talks to an `EngineClient` and knows no Ray."""
