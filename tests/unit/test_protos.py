"""The committed stubs in ragline/v1 must be exactly what protoc makes of protos/."""

from pathlib import Path

import pytest

from cli import protogen

pytest.importorskip("grpc_tools")


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    generated = protogen.generate(tmp_path)
    committed_dir = protogen.REPO_ROOT / "ragline" / "v1"
    assert generated, "protoc produced nothing"
    stale = [
        p.name for p in generated if not (committed_dir / p.name).exists()
        or (committed_dir / p.name).read_bytes() != p.read_bytes()
    ]  # fmt: skip
    assert not stale, f"stale stubs {stale}: run `make protos` and commit ragline/v1"
    expected = {p.name for p in generated} | {"__init__.py"}
    extra = {p.name for p in committed_dir.iterdir() if p.is_file()} - expected
    assert not extra, f"stubs without a proto in ragline/v1: {sorted(extra)}"


def test_every_service_is_described_for_reflection() -> None:
    from ragline.v1 import embed_pb2, generate_pb2, retrieve_pb2

    names = {
        embed_pb2.DESCRIPTOR.services_by_name["Embed"].full_name,
        retrieve_pb2.DESCRIPTOR.services_by_name["Retrieve"].full_name,
        generate_pb2.DESCRIPTOR.services_by_name["Generate"].full_name,
    }
    assert names == {"ragline.v1.Embed", "ragline.v1.Retrieve", "ragline.v1.Generate"}
