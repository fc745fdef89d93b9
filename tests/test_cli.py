"""The ``wuneng`` command: subcommands, resolved config, clear errors with exit code 2."""

from __future__ import annotations

import pytest
import yaml
from train_support import REPO, tiny_config, write_yaml

from train.cli import main
from train.config import from_dict


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "prepare-data" in out


def test_dry_run_prints_the_resolved_config(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run", "store"))
    assert main(["train", str(cfg), "--dry-run", "steps=17", "optimizer.lr=3e-4", "mesh.tensor=1"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    resolved = from_dict(printed)
    assert resolved.steps == 17 and resolved.optimizer.lr == 3e-4 and resolved.mesh.tensor == 1


def test_demo_config_is_valid():
    from train.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.data.prepare == ("stdlib",) and cfg.eval.sample_tokens > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.schedule=linear", "`optimizer.schedule`: 'linear' is not one of"),
        ("model=no_such_preset", "config field `model`"),
        ("model.num_heads=3", "config field `model`"),  # Qwen2Config validation, re-raised
        ("mesh.data=3", "has 12 devices but 8 are available"),
        ("model.param_dtype=bfloat16", "float32 master weights"),
    ],
)
def test_bad_configs_exit_2_with_a_clear_message(tmp_path, capsys, override, message):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run", str(tmp_path / "store")))
    assert main(["train", str(cfg), override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("wuneng train: error:")


def test_missing_store_is_a_clear_error(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run", str(tmp_path / "nostore")))
    assert main(["train", str(cfg)]) == 2
    assert "wuneng prepare-data" in capsys.readouterr().err


def test_prepare_data_delegates(tmp_path, capsys):
    out = tmp_path / "store"
    assert (
        main(["prepare-data", "stdlib", "--out", str(out), "--stdlib-max-files", "3", "--no-progress"]) == 0
    )
    assert "complete" in capsys.readouterr().out
    assert (out / "manifest.json").is_file()
