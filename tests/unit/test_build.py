"""`raylm build`: a Serve config file whose app args load back into the same raylm config."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from raylm.cli import app
from raylm.config import AppConfig, load_config
from raylm.serve.control.builder import serve_config_file

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.mark.parametrize("name", ["production.yaml", "multi_model.yaml", None])
def test_the_serve_config_round_trips(name, tmp_path):
    config = load_config(EXAMPLES / name if name else None)
    out = tmp_path / "serve.yaml"
    result = CliRunner().invoke(app, ["build", *([str(EXAMPLES / name)] if name else []), "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(out.read_text())
    assert written["proxy_location"] == "Disabled"
    (application,) = written["applications"]
    assert application["import_path"] == "raylm.serve:build_app" and application["route_prefix"] is None
    assert AppConfig.model_validate(application["args"]) == config


def test_api_keys_never_go_into_the_file():
    config = AppConfig.model_validate({"serve": {"api_keys": [{"tenant": "a", "key": "sk-secret"}]}})
    with pytest.raises(ValueError, match="api_keys_file"):
        serve_config_file(config)
