"""Every Ray actor and Serve deployment: the gateway deployment (HTTP), the head deployment (engine + remote
experts), and the expert-worker actor (a gRPC server holding (layer, expert) pairs). `cluster/app.py`
binds the two deployments into the Serve application."""
