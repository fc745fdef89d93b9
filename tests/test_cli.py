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


def _hf_dir(path, config_text: str):
    path.mkdir()
    (path / "config.json").write_text(config_text)
    return path


QWEN2_JSON = (
    '{"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, '
    '"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}'
)


@pytest.mark.parametrize(
    "make, command, message",
    [
        (
            lambda t: (t / "c.yaml").write_text("run_dir: x\nmodel: [a, b\nsteps: 3\n") and t / "c.yaml",
            ["train"],
            "c.yaml:3:6: malformed YAML (expected ',' or ']', but got ':'); fix the file at that line",
        ),
        (
            lambda t: _hf_dir(t / "hf", '{"model_type": "qwen2",\n'),
            ["generate", "--prompt", "x"],
            "hf/config.json:2:1: malformed JSON (Expecting property name enclosed in double quotes)",
        ),
        (
            lambda t: _hf_dir(t / "hf", '{"model_type": "qwen2"}'),
            ["eval"],
            "hf/config.json: missing required key(s) ['vocab_size'",
        ),
        (
            lambda t: _hf_dir(t / "hf", QWEN2_JSON),
            ["generate", "--prompt", "x"],
            "no weights: neither model.safetensors nor model.safetensors.index.json found",
        ),
        (lambda t: t / "no_run", ["eval"], "no_run' does not exist; give a run directory"),
        (lambda t: t / "w.safetensors", ["generate", "--prompt", "x"], "w.safetensors' does not exist"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, capsys, make, command, message):
    target = make(tmp_path)
    code = main([command[0], str(target), *command[1:]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"wuneng {command[0]}: error: ") and message in err


def test_multiple_choice_lines_without_choices_are_named(tmp_path):
    from train.data.tokenizer import ByteTokenizer
    from train.evaluate import load_mc_jsonl

    path = tmp_path / "mc.jsonl"
    path.write_text(
        '{"context": "a", "choices": ["b", "c"], "gold": 0}\n{"context": "a", "choices": [], "gold": 0}\n'
    )
    with pytest.raises(
        ValueError, match=r'mc.jsonl:2: "choices" must list at least 2 strings, got \[\]; each line'
    ):
        load_mc_jsonl(path, ByteTokenizer())


def test_plain_commands_on_a_cpu_host_do_not_probe_libtpu(tmp_path):
    """With libtpu installed (the tpu-aot extra) and JAX_PLATFORMS unset, a command that starts the JAX
    backend prints its one error line and nothing from a TPU probe."""
    import subprocess

    from train_support import PYTHON, subprocess_env

    env = {k: v for k, v in subprocess_env(1).items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run", str(tmp_path / "store")))
    proc = subprocess.run(
        [PYTHON, "-m", "train.cli", "train", str(cfg), "mesh.data=3"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("wuneng train: error: mesh") and proc.stderr.count("\n") == 1, proc.stderr


def test_an_explicit_platform_is_kept(monkeypatch):
    from train.platform import pin_cpu_without_accelerator

    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert pin_cpu_without_accelerator() is False


def test_help_texts_name_no_issue_numbers():
    """Help is for users: no tracker references (`issue 9`, `#12`) in any subcommand's or script's help."""
    import ast
    import re

    from train.cli import build_parser

    pattern = re.compile(r"\bissue\s*#?\d|#\d+\b", re.IGNORECASE)
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    texts = {f"wuneng {name}": p.format_help() for name, p in subparsers.items()}
    texts["wuneng"] = parser.format_help()
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        texts[str(script)] = ast.get_docstring(ast.parse(script.read_text())) or ""
    for module in ("wuneng_jax/params_report.py", "train/lm_eval_adapter.py"):
        texts[module] = ast.get_docstring(ast.parse((REPO / module).read_text())) or ""
    assert {k: pattern.findall(v) for k, v in texts.items() if pattern.search(v)} == {}


def test_readme_and_docs_link_only_inside_the_repository():
    """README.md and docs/ are read on a fresh clone: no web links, no paths outside the repository, and
    every markdown link points at a file that exists."""
    import re

    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    bad = []
    for page in pages:
        text = page.read_text()
        bad += [f"{page.name}: {url}" for url in re.findall(r"\bhttps?://\S+", text)]
        bad += [f"{page.name}: {path}" for path in re.findall(r"`(\.\./[^`]*)`", text)]
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            resolved = (page.parent / target).resolve()
            if not (resolved.is_relative_to(REPO) and resolved.exists()):
                bad.append(f"{page.name}: ({target})")
    assert bad == []
