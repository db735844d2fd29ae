"""The HTTP face: app (routes, auth, shutdown), stream (SSE), protocol (wire types), metrics."""
