# The registry image: API server, workers, dispatcher, Flower. MLflow ships with it as a dependency.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY registry ./registry
COPY workers ./workers
COPY migrations ./migrations
# CPU torch from the PyTorch index keeps the image small; drop the index URL for a CUDA build on GPU workers.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt ".[prod]"
EXPOSE 8080
CMD ["python", "-m", "registry", "up", "--host", "0.0.0.0"]
