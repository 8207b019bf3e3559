"""``charnn serve``: a model behind HTTP (an OpenAI-style completions API, scoring, a page).

scheduler.py decodes concurrent requests together on one worker thread; app.py is the
Starlette application (``create_app``); request.py validates what clients send. The serve
stack (Starlette, uvicorn, sse-starlette, prometheus-client) is the ``serve`` extra: importing
app.py without it raises ImportError.
"""
