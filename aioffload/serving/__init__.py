"""The HTTP face: app (routes, auth, shutdown), routes (models, tokenize, version, openapi), stream
(one response's choices as SSE or JSON), protocol (wire types), validation (field checks, refused
fields), chat (messages, tools), tool_parsers + tool_calls (calls out of the output), responses
(JSON shapes), openapi, metrics."""
