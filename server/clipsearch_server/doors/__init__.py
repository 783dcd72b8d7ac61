"""The server's doors: what stands between a caller and the servicer.

auth (tokens, scopes, TLS), admission (call budgets), the HTTP door (http_gate: checks on a
request's head; http_limits: slow clients at both doors; connect_bridge: the servicer under
connectrpc; http_server: the ASGI app and uvicorn) and the page in web/. The gRPC door itself
is grpc.aio's server, assembled in app.py with these interceptors.
"""
