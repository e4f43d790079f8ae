import raylm.serve


def test_serve_exports():
    assert raylm.serve.__all__ == ["APP_NAME", "build_app"]


def test_build_app_from_a_serve_yaml_args_dict(tmp_path):
    path = tmp_path / "raylm.yaml"
    path.write_text("models:\n  - {name: a, source: /m/a}\n  - {name: b, source: /m/b, task: embed}\n")
    for args in ({"config": str(path)}, {"models": [{"name": "a", "source": "/m/a"},
                                                    {"name": "b", "source": "/m/b", "task": "embed"}]}):
        app = raylm.serve.build_app(args)
        assert type(app).__name__ == "Application"
