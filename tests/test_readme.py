"""The README's Python snippets run as written, against a run trained here in seconds."""
import os
import re

import pytest

from ctxjax import train
from test_train import REPO, tiny_config


def readme_snippets():
    text = open(os.path.join(REPO, "README.md")).read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_snippets():
    assert readme_snippets(), "the README lost its Python examples"


@pytest.mark.parametrize("index", range(len(readme_snippets())))
def test_readme_snippet_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the snippets name runs/tiny, relative to where they run
    config = tiny_config(steps=2)
    train.train_and_evaluate(config, "runs/tiny")
    capsys.readouterr()
    exec(compile(readme_snippets()[index], f"README.md snippet {index}", "exec"), {})
    assert capsys.readouterr().out.strip(), "the snippet printed nothing"
