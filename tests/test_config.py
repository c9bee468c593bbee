import subprocess
import sys

import pytest

import config
from config import ConfigError, DefaultConfig, option_help, option_names
from conftest import ROOT


def test_overrides_are_applied_and_typed():
    opt = config.parse({'lr': 1, 'max-epoch': 3, 'env': 123, 'vis': 'False'}, verbose=False)
    assert opt.lr == 1.0 and isinstance(opt.lr, float)
    assert opt.max_epoch == 3
    assert opt.env == '123'
    assert opt.vis is False


def test_instances_do_not_share_overrides():
    config.parse({'lr': 0.5}, verbose=False)
    assert DefaultConfig().lr == DefaultConfig.lr


def test_unknown_option_suggests_the_closest():
    with pytest.raises(ConfigError, match='unknown option lrr; did you mean lr?'):
        config.parse({'lrr': 1}, verbose=False)
    # the book README's own misspellings are caught, not silently ignored
    with pytest.raises(ConfigError, match='unknown option load_path; did you mean load_model_path?'):
        config.parse({'load-path': 'x.pth'}, verbose=False)


@pytest.mark.parametrize('key,value', [('batch_size', 'many'), ('lr', 'fast'), ('vis', 'maybe'),
                                        ('max_epoch', 2.5)])
def test_wrong_type_names_the_option(key, value):
    with pytest.raises(ConfigError, match=f'option {key} expects'):
        config.parse({key: value}, verbose=False)


def test_every_option_has_help():
    assert [row[0] for row in option_help()] == option_names()
    assert all(meaning for _, _, meaning in option_help())


def run_main(*args):
    return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_reports_a_misspelt_option_without_traceback():
    result = run_main('train', '--lrr=1')
    assert result.returncode == 2
    assert 'error: unknown option lrr; did you mean lr?' in result.stderr
    assert 'Traceback' not in result.stderr


def test_cli_help_lists_every_option_with_default():
    result = run_main('help')
    assert result.returncode == 0
    for name, default, _ in option_help():
        assert f'--{name}' in result.stdout and repr(default) in result.stdout


def test_readme_documents_every_option():
    with open(f'{ROOT}/README.md') as f:
        readme = f.read()
    missing = [name for name in option_names() if f'`--{name}`' not in readme]
    assert not missing, f'README option table lacks {missing}: paste `python main.py help --markdown`'
