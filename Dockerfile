FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY userstream ./userstream
COPY stream ./stream
COPY model ./model
COPY serving ./serving
RUN pip install --no-cache-dir .
ENV DATA_DIR=/data
CMD ["userstream", "--help"]
