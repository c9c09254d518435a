"""The README's commands, links and the packaging it describes; the docs site's pages (`mkdocs build --strict`
checks their links and anchors in .ci/run)."""

import re
from pathlib import Path

import yaml
from setuptools.config.setupcfg import read_configuration

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```\w*\n(.*?)^```", text, re.S | re.M)


def _commands(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_starts_with_the_install_and_test_commands():
    first = _code_blocks(README)[0]
    assert README.index("```") < README.index("\n## "), "the commands come before the first section"
    install, tests = _commands(first)
    steps = [step.strip() for step in install.split("&&")]
    assert steps[:2] == ["apt-get update", "apt-get install -y dataset-fashion-mnist g++ ninja-build"]
    assert "python3 -m venv .venv" in steps and ". .venv/bin/activate" in steps
    pip = [step for step in steps if step.startswith("pip install")]
    assert pip == ['pip install -e ".[examples]"'], "the ordinary install, torch not pinned"
    assert steps[-1].startswith("python examples/fashion_mnist.py fit --model.net lenet300 ")
    assert "--trainer.callbacks+=lightning_sparse.SparseTrainingCallback --trainer.callbacks.density 0.05" in steps[-1]
    assert [step.strip() for step in tests.split("&&")] == [
        ". .venv/bin/activate",
        'pip install -e ".[test]"',
        "python -m pytest -q",
    ]
    # the callback in 5 lines, on the first screen
    assert "SparseTrainingCallback(density=0.05)" in _code_blocks(README)[1]
    assert "--trainer.callbacks.help lightning_sparse.SparseTrainingCallback" in README


def test_readme_links_stay_in_the_repository():
    links = re.findall(r"\]\(([^)]+)\)", README)
    assert links, "the README links to the docs pages"
    for link in links:
        assert not re.match(r"[a-z]+://", link), f"README links outside the repository: {link}"
        path = (ROOT / link.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.is_file(), f"README links to a missing file: {link}"
    assert "shared/" not in README and "../" not in README
    for page in (ROOT / "docs").rglob("*.md"):
        text = page.read_text()
        assert "shared/" not in text and not re.search(r"\]\(\.\./\.\.", text), page


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for entry in nav:
            if isinstance(entry, str):
                yield entry
            else:
                for value in entry.values():
                    yield from pages(value) if isinstance(value, list) else [value]

    in_nav = set(pages(config["nav"]))
    on_disk = {str(page.relative_to(ROOT / "docs")) for page in (ROOT / "docs").rglob("*.md")}
    # docs/hf_trainer.md (another branch) joins the nav when it is merged
    assert on_disk - {"hf_trainer.md"} <= in_nav
    assert in_nav <= on_disk, in_nav - on_disk


def test_extras():
    extras = read_configuration(ROOT / "setup.cfg")["options"]["extras_require"]
    names = lambda extra: {re.split(r"[<>=\[]", req)[0] for req in extras[extra]}  # noqa: E731
    assert set(extras) == {"export", "plot", "examples", "hf", "docs", "test", "dev", "all"}
    # the default test run skips the timm and transformers tests without them; ruff is not a test dependency
    assert not names("test") & {"ruff", "timm", "transformers", "mkdocs"}
    assert {"pytest", "scikit-learn", "torch-pruning", "matplotlib", "tensorboard", "torchdata"} <= names("test")
    assert names("docs") == {"mkdocs", "mkdocs-material", "mkdocstrings"}
    assert names("hf") == {"transformers", "accelerate"}  # what the Hugging Face Trainer integration needs
    assert names("test") | names("docs") | names("hf") | {"ruff", "timm"} <= names("dev")
    assert set().union(*(names(extra) for extra in extras)) == names("all")
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
