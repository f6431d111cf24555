"""`decodekit serve`: the OpenAI API over the batched engine (FastAPI + uvicorn; `pip install decodekit[serve]`).

app.py (routes), schemas.py (request bodies -> engine requests), worker.py (the engine thread), responses.py (OpenAI
response objects), metrics.py (Prometheus), server.py (uvicorn), cli.py (the command).
"""
