"""The retriever's connection limits subclass uvicorn's private HttpToolsProtocol: they run on the uvicorn and
httptools versions they were tested with, and refuse to start, naming both versions, on any other."""

from __future__ import annotations

import logging
import re
from importlib import metadata

import pytest
from helpers import ROOT

from searchr1.retrieval import guarded_protocol as gp
from searchr1.retrieval.server import ClientCounters, HttpLimits


def _pins() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    return {name: re.search(rf'"{name}==([^"]+)"', text).group(1) for name in gp.TESTED_VERSIONS}


def test_tested_versions_are_the_pinned_and_the_installed_ones():
    assert gp.TESTED_VERSIONS == _pins()
    assert {name: metadata.version(name) for name in gp.TESTED_VERSIONS} == gp.TESTED_VERSIONS
    gp.check_versions()  # passes here, so the hostile-client tests run the guarded protocol
    assert gp.guarded_protocol(HttpLimits(), ClientCounters()).__mro__[1].__name__ == "HttpToolsProtocol"


def _fake_versions(monkeypatch, **versions: str | None) -> None:
    real = metadata.version

    def version(name: str) -> str:
        if name in versions:
            if versions[name] is None:
                raise metadata.PackageNotFoundError(name)
            return versions[name]
        return real(name)

    monkeypatch.setattr(gp.metadata, "version", version)


def test_another_uvicorn_is_refused_naming_both_versions(monkeypatch):
    _fake_versions(monkeypatch, uvicorn="0.55.0")
    with pytest.raises(gp.UntestedVersionError) as err:
        gp.guarded_protocol(HttpLimits(), ClientCounters())
    msg = str(err.value)
    assert "installed: uvicorn 0.55.0, httptools 0.9.0" in msg
    assert "tested with uvicorn 0.54.0, httptools 0.9.0 only" in msg
    assert "pip install 'uvicorn==0.54.0' 'httptools==0.9.0'" in msg


def test_a_missing_httptools_is_refused(monkeypatch):
    _fake_versions(monkeypatch, httptools=None)
    with pytest.raises(gp.UntestedVersionError, match="httptools not installed"):
        gp.check_versions()


def test_serve_refuses_before_loading_anything(monkeypatch, tmp_path, caplog):
    """`serve` checks first: no corpus, index or encoder exists here, and the version is what it names."""
    from searchr1.retrieval.__main__ import main

    _fake_versions(monkeypatch, uvicorn="0.60.1")
    missing = str(tmp_path / "nothing")
    with caplog.at_level(logging.ERROR, logger="searchr1.retrieval"):
        rc = main(["serve", "--corpus", missing, "--index", missing, "--encoder", missing, "--port", "0"])
    assert rc == 2
    assert "refusing to start" in caplog.text and "installed: uvicorn 0.60.1" in caplog.text
    assert "nothing" not in caplog.text  # nothing else was looked at
