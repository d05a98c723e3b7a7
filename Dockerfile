# One image for the API and the workers (the command differs). CPU torch by default; for CUDA
# workers build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv/squeeze
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install -e .
RUN useradd --create-home squeeze && mkdir -p /data && chown squeeze /data
USER squeeze
ENV SQUEEZE_DATA_DIR=/data
EXPOSE 8000
CMD ["squeeze", "serve", "--host", "0.0.0.0", "--no-worker"]
