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


def test_cluster_checks_its_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MonolithCluster(instances=0, corpus=tmp_path)
    with pytest.raises(ValueError, match="instance_ports"):
        MonolithCluster(instances=2, corpus=tmp_path, instance_ports=[9001])
