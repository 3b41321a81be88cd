"""Inlaid's OpenAI-compatible HTTP front: an ASGI app (Starlette, served by uvicorn) over
the client SDK. No torch, no model: every request becomes an SDK call to `inlaid serve`.

Modules: `app` (endpoints), `schema` (OpenAI's JSON bodies), `translate` (OpenAI <-> SDK),
`errors` (OpenAI's error JSON), `front_metrics` (the front's own HTTP metrics), `settings`
(the `[http]` config section), `cli` (`inlaid http`), `process` (started by `inlaid serve`).
This package's import pulls in nothing: the server config reads `settings` cheaply.
"""
