# The server-side image: `revline consumer`, `revline migrate`. No Bluetooth or OBD libraries.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY revline ./revline
COPY consumer ./consumer
COPY edge ./edge
COPY sql ./sql
RUN pip install --no-cache-dir '.[consumer]' \
    && useradd --system --no-create-home revline
USER revline
ENTRYPOINT ["revline"]
CMD ["consumer"]
