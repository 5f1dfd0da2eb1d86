"""The monolith baseline's pieces that need no server: nginx.conf, corpus reading, errors."""

from __future__ import annotations

import pytest

from loadtest.monolith import MonolithCluster, find_nginx, read_corpus, render_nginx_conf
from ragline.chunking import ChunkingPolicy, chunk_text


def test_nginx_conf_is_the_write_ups_least_conn_upstream(tmp_path) -> None:
    conf = render_nginx_conf(tmp_path, 8000, [9001, 9002, 9003], read_timeout=90)
    upstream = conf[conf.index("upstream monolith") : conf.index("server {")]
    assert "least_conn;" in upstream
    for port in (9001, 9002, 9003):
        assert f"server 127.0.0.1:{port} max_fails=3 fail_timeout=30s;" in upstream
    assert "listen 127.0.0.1:8000;" in conf and "proxy_read_timeout 90s;" in conf
    assert "daemon off;" in conf
    assert render_nginx_conf(tmp_path, 8000, [9001]).count("proxy_read_timeout 60s;") == 1


def test_nginx_conf_writes_nothing_outside_its_directory(tmp_path) -> None:
    conf = render_nginx_conf(tmp_path, 8000, [9001])
    for directive in ("pid", "error_log", "access_log", "client_body_temp_path",
                      "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path",
                      "scgi_temp_path"):  # fmt: skip
        line = next(x.strip() for x in conf.splitlines() if x.strip().startswith(directive + " "))
        assert line.split()[1].startswith(f"{tmp_path}/"), line
    assert "/var/" not in conf and "/etc/" not in conf


def test_missing_nginx_says_how_to_install_it(tmp_path) -> None:
    with pytest.raises(RuntimeError, match=r"apt-get install nginx.*make nginx"):
        find_nginx("no-such-nginx-binary")
    with pytest.raises(RuntimeError, match="make nginx"):
        MonolithCluster(instances=1, corpus=tmp_path, nginx="no-such-nginx-binary")


def test_corpus_passages_carry_ragline_ingestion_ids_and_metadata(tmp_path) -> None:
    (tmp_path / "policies").mkdir()
    long = "# Travel\n\nIntro.\n\n## Trains\n\n" + " ".join(f"w{i}" for i in range(400)) + "\n"
    (tmp_path / "policies" / "travel.md").write_text(long)
    (tmp_path / "notes.txt").write_text("No heading here, just a line.\n")
    (tmp_path / "empty.md").write_text("  \n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")

    docs = read_corpus(tmp_path, 160, 30)
    ids = [[p.id for p in doc] for doc in docs]
    chunks = chunk_text(long, ChunkingPolicy(160, 30))
    assert ids == [["notes.txt#0"], [f"policies/travel.md#{c.index}" for c in chunks]]
    travel = docs[1]
    assert [p.text for p in travel] == [c.text for c in chunks]
    assert travel[0].metadata == {"source": "policies/travel.md", "title": "Travel",
                                  "heading": chunks[0].heading}  # fmt: skip
    assert docs[0][0].metadata == {"source": "notes.txt", "title": "notes"}


def count(texts: list[str]) -> tuple[list[int], int]:
    """A stand-in tokenizer: 4 characters a token, a model limit of 200."""
    return [len(t) // 4 + 2 for t in texts], 200


class _FakeStages:
    """Embed and retrieve stand-ins for ``Ingestor``, counting with ``count``."""

    def __init__(self) -> None:
        self.passages = []

    async def count_tokens(self, texts, kind=None, timeout=None):
        return count(texts)

    async def embed(self, texts, kind=None, truncate=True, timeout=None):
        import numpy as np

        from ragline.types import Embeddings

        return Embeddings(np.zeros((len(texts), 4), np.float32), "fake", (0,) * len(texts))

    async def info(self, timeout=None):
        from ragline.types import EmbedderInfo

        return EmbedderInfo("fake", 4, 200, 32)

    async def create_collection(self, *args, **kwargs) -> None:
        pass

    async def get_documents(self, *args, **kwargs):
        return {}

    async def upsert(self, collection, passages, documents, timeout=None) -> None:
        self.passages += passages


async def test_corpus_is_fitted_to_tokens_as_ingestion_fits_it(tmp_path) -> None:
    from services.api.ingest import Ingestor

    code = "\n".join(f"smtpd_option_{i} = /etc/postfix/table_{i}.cf" for i in range(150))
    text = "# Postfix\n\nIntro.\n\n## Options\n\n" + code + "\n"
    (tmp_path / "postfix.md").write_text(text)
    stages = _FakeStages()
    policy = ChunkingPolicy(160, 30, 240)
    await Ingestor(stages, stages, "c", policy).ingest_text("postfix.md", text)
    (fitted,) = read_corpus(tmp_path, 160, 30, 240, count)
    assert [(p.id, p.text, p.metadata) for p in fitted] == [
        (p.id, p.text, p.metadata) for p in stages.passages
    ]
    (words_only,) = read_corpus(tmp_path, 160, 30)
    assert [p.text for p in words_only] == [c.text for c in chunk_text(text)]
    assert len(fitted) > len(words_only) and all(len(p.text) // 4 + 2 <= 200 for p in fitted)
    assert len(read_corpus(tmp_path, 160, 30, 0, count)[0]) == len(words_only), "0: words only"


def test_cluster_checks_its_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MonolithCluster(instances=0, corpus=tmp_path)
    with pytest.raises(ValueError, match="instance_ports"):
        MonolithCluster(instances=2, corpus=tmp_path, instance_ports=[9001])
