"""The one-line message while a C++ kernel compiles (issue 23, item 5): announced when the build is missing or
stale, silent when cached."""

from __future__ import annotations

import logging
import os

import pytest

from lightning_sparse import kernels


def _fake_build(tmp_path, source, name="lightning_sparse_fake"):
    directory = tmp_path / "ext" / name
    directory.mkdir(parents=True)
    (directory / "build.ninja").write_text(f"build fake.o: compile {source}\n")
    library = directory / f"{name}.so"
    library.write_bytes(b"")
    return library


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    path = csrc / "fake.cpp"
    path.write_text("// fake\n")
    (csrc / "helpers.h").write_text("// helpers\n")
    os.utime(path, (1000, 1000))
    os.utime(csrc / "helpers.h", (1000, 1000))
    return path


def test_needs_build(tmp_path, source):
    name = "lightning_sparse_fake"
    assert kernels._needs_build(name, source)  # nothing built yet
    library = _fake_build(tmp_path, source)
    os.utime(library, (2000, 2000))
    assert not kernels._needs_build(name, source)  # cached
    os.utime(source.parent / "helpers.h", (3000, 3000))
    assert kernels._needs_build(name, source)  # a header changed
    os.utime(library, (4000, 4000))
    assert not kernels._needs_build(name, source)
    (library.parent / "build.ninja").write_text("build fake.o: compile /elsewhere/fake.cpp\n")
    assert kernels._needs_build(name, source)  # built from another checkout's source


def _load_logged(monkeypatch, caplog, source, needs):
    calls = []
    monkeypatch.setattr(kernels, "_needs_build", lambda name, src: needs)
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kwargs: calls.append(kwargs["name"]))
    with caplog.at_level(logging.INFO, logger="lightning_sparse.kernels"):
        kernels._load("lightning_sparse_fake", source)
    assert calls == ["lightning_sparse_fake"]
    return [r.getMessage() for r in caplog.records if r.name == "lightning_sparse.kernels"]


def test_compiling_is_announced_once(monkeypatch, caplog, tmp_path, source):
    messages = _load_logged(monkeypatch, caplog, source, True)
    assert messages == [
        f"lightning-sparse: compiling the C++ kernel fake (first use, ~10 s; cached in {tmp_path / 'ext'})"
    ]


def test_cached_build_is_silent(monkeypatch, caplog, capsys, source):
    assert _load_logged(monkeypatch, caplog, source, False) == []
    assert capsys.readouterr().err == ""


def test_message_goes_to_stderr_without_logging_handlers(monkeypatch, capsys, source):
    monkeypatch.setattr(kernels.log, "isEnabledFor", lambda level: False)
    monkeypatch.setattr(kernels, "_needs_build", lambda name, src: True)
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kwargs: None)
    kernels._load("lightning_sparse_fake", source)
    assert capsys.readouterr().err.startswith("lightning-sparse: compiling the C++ kernel fake (first use")
