"""`whisper-lora serve`: a thin HTTP layer over the transcription service.

    service.py   the model pool and the batcher every front end shares (no web framework: usable alone)
    api.py       OpenAI's audio routes (transcriptions, translations, models), health and metrics
    realtime.py  OpenAI's realtime transcription WebSocket
    ui.py        the Gradio web UI, mounted at /ui
    errors.py    every error in OpenAI's shape {"error": {"message", "type", "param", "code"}}
    limits.py    the upload limit, counted while the body arrives
    metrics.py   Prometheus counters and histograms

FastAPI, uvicorn and Gradio are imported only by the front ends (api, realtime, ui, errors, limits,
metrics): `pip install 'whisper-lora[serve]'`.
"""
