import importlib
from pathlib import Path

import yaml

import raylm.serve

ROOT = Path(__file__).resolve().parents[2]


def test_every_serve_file_we_ship_names_the_builder_that_exists():
    """`serve run`/`serve deploy` and KubeRay resolve `import_path` themselves: a moved builder breaks them."""
    def import_paths(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from [value] if key == "import_path" else import_paths(value)
        elif isinstance(node, list):
            for item in node:
                yield from import_paths(item)
        elif isinstance(node, str) and "import_path:" in node:  # a Serve config inlined as a string
            yield from import_paths(yaml.safe_load(node))

    paths = [p for f in (ROOT / "examples/serve_app.yaml", ROOT / "deploy/kuberay/raylm.yaml")
             for doc in yaml.safe_load_all(f.read_text()) for p in import_paths(doc)]
    assert len(paths) == 2
    for import_path in paths:
        module, _, name = import_path.partition(":")
        assert getattr(importlib.import_module(module), name) is raylm.serve.build_app


def test_build_app_from_a_serve_yaml_args_dict(tmp_path):
    path = tmp_path / "raylm.yaml"
    path.write_text("models:\n  - {name: a, source: /m/a}\n  - {name: b, source: /m/b, task: embed}\n")
    for args in ({"config": str(path)}, {"models": [{"name": "a", "source": "/m/a"},
                                                    {"name": "b", "source": "/m/b", "task": "embed"}]}):
        app = raylm.serve.build_app(args)
        assert type(app).__name__ == "Application"
