"""The monolith baseline's pieces that need no server: nginx.conf, corpus reading, errors."""

from __future__ import annotations

import time

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


# --- streaming, with a stand-in for llama-cpp-python's Llama --------------------------------


class FakeLlama:
    """``create_completion`` (whole or streamed, one word a token, 5 ms each), ``tokenize`` and
    the context's sequence (``n_tokens``/``_input_ids``) as llama-cpp-python keeps them."""

    def __init__(self, reply: str = "You get 27 days of leave") -> None:
        import numpy as np

        self.reply = reply.split(" ")
        self.vocab: dict[str, int] = {}
        self.n_tokens = 0
        self._input_ids = np.zeros(0, dtype=np.intc)
        self.active = self.max_active = self.closed = self.sampled = 0

    def n_ctx(self) -> int:
        return 64

    def tokenize(self, text: bytes, add_bos: bool = False, special: bool = False) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.decode().split()]

    def create_completion(self, tokens, stream=False, max_tokens=16, **kwargs):
        assert kwargs["temperature"] == 0.0 and kwargs["stop"] == ["<|end|>"]
        if not stream:
            words = self.reply[:max_tokens]
            self._remember(tokens, words)
            usage = {"prompt_tokens": len(tokens), "completion_tokens": len(words)}
            return {"choices": [{"text": " ".join(words), "finish_reason": "stop"}],
                    "usage": usage}  # fmt: skip
        return self._stream(tokens, max_tokens)

    def _stream(self, tokens, max_tokens):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        words = []
        try:
            for word in self.reply[:max_tokens]:
                time.sleep(0.005)
                self.sampled += 1
                words.append(word)
                yield {"choices": [{"text": (" " if len(words) > 1 else "") + word,
                                    "finish_reason": None}]}  # fmt: skip
            finish = "length" if len(self.reply) > max_tokens else "stop"
            yield {"choices": [{"text": "", "finish_reason": finish}]}
        except GeneratorExit:
            self.closed += 1
            raise
        finally:
            self._remember(tokens, words)
            self.active -= 1

    def _remember(self, tokens, words) -> None:
        import numpy as np

        ids = list(tokens) + self.tokenize(" ".join(words).encode())
        self._input_ids, self.n_tokens = np.array(ids, dtype=np.intc), len(ids)


def fake_monolith(llm: FakeLlama):
    import asyncio
    from types import SimpleNamespace

    from loadtest.monolith import Monolith

    m = object.__new__(Monolith)  # its models stand in; the generation logic is the real one
    m.lock, m.llm = asyncio.Lock(), llm
    m.formatter = lambda messages: SimpleNamespace(
        prompt="system: answer from the passages . user: " + messages[-1]["content"],
        stop="<|end|>",
    )
    return m


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "x"}, {"role": "user", "content": question}]


async def collect(m, question: str, max_tokens: int = 16):
    from ragline.types import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0)
    return [c async for c in m.stream(messages(question), params)]


async def test_monolith_streams_one_generation_at_a_time_with_usage_and_reused_prefix() -> None:
    import asyncio

    llm = FakeLlama()
    m = fake_monolith(llm)
    first, second = await asyncio.gather(
        collect(m, "how much leave do I get ?"), collect(m, "how much leave for parents ?")
    )
    assert llm.max_active == 1, "the lock keeps generations one at a time"
    for chunks, prompt_tokens in ((first, 14), (second, 13)):
        assert "".join(c.text for c in chunks) == "You get 27 days of leave"
        assert [c.finish_reason for c in chunks[:-1]] == [None] * 6
        last = chunks[-1]
        assert last.text == "" and last.finish_reason == "stop"
        assert last.usage.prompt_tokens == prompt_tokens and last.usage.completion_tokens == 6
    # The second prompt shares "system: ... user: how much leave" with the first's sequence,
    # which llama-cpp-python keeps in its context and does not evaluate again.
    assert first[-1].usage.cached_prompt_tokens == 0
    assert second[-1].usage.cached_prompt_tokens == 10
    # An identical prompt: all but the one token llama.cpp always evaluates again.
    again = await collect(m, "how much leave for parents ?")
    assert again[-1].usage.cached_prompt_tokens == 12
    done = m._generate(messages("how much leave for parents ?"), again_params(4))
    assert done.usage.completion_tokens == 4 and done.usage.cached_prompt_tokens == 12


def again_params(max_tokens: int):
    from ragline.types import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0)


async def test_monolith_stream_stops_its_worker_when_the_client_leaves_and_counts_a_cap() -> None:
    llm = FakeLlama(" ".join(f"w{i}" for i in range(40)))
    m = fake_monolith(llm)
    stream = m.stream(messages("a question"), again_params(30))
    assert (await anext(stream)).text == "w0"
    await stream.aclose()  # the client went away
    assert llm.closed == 1 and llm.sampled < 30, "llama.cpp stopped sampling"
    assert not m.lock.locked() and llm.active == 0, "the worker ended before the lock was free"
    capped = await collect(m, "a question", max_tokens=5)
    assert capped[-1].finish_reason == "length" and capped[-1].usage.completion_tokens == 5


async def test_monolith_stream_raises_a_prompt_too_long_for_the_context_to_the_request() -> None:
    from ragline.errors import InvalidArgument

    m = fake_monolith(FakeLlama())
    with pytest.raises(InvalidArgument, match="the context holds 64"):
        await collect(m, " ".join(["word"] * 80))
    assert not m.lock.locked()
