# The registry image: API server, workers, dispatcher, Flower. MLflow ships with it as a dependency.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY registry ./registry
COPY workers ./workers
COPY migrations ./migrations
# TORCH_INDEX_URL: CPU torch from the PyTorch index by default keeps the image small. The compose gpu-worker
# builds with TORCH_INDEX_URL="" so pip takes PyPI's Linux wheel, which is the CUDA build (or pass a CUDA index,
# e.g. https://download.pytorch.org/whl/cu128). constraints.txt pins torch==X, which matches X+cpu and X+cuNNN.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url=$TORCH_INDEX_URL} -c constraints.txt ".[prod]"
EXPOSE 8080
CMD ["python", "-m", "registry", "up", "--host", "0.0.0.0"]
