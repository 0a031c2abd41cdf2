"""`whisper-lora serve`: a thin HTTP layer over the transcription service.

    api.py       OpenAI's audio routes (transcriptions, translations, models), health and metrics
    errors.py    every error in OpenAI's shape {"error": {"message", "type", "param", "code"}}
    limits.py    the upload limit, counted while the body arrives
    metrics.py   Prometheus counters and histograms

FastAPI and uvicorn are imported only here: `pip install 'whisper-lora[serve]'`.
"""
