"""Lenient inputs (issue 13): a YAML key given twice is refused with its line, at any depth and
wherever YAML is read (experiment files, ``--set`` values, converted Rare Gems configs); merge keys
(``<<``) may still be overridden, as YAML intends."""
from __future__ import annotations

import pytest
import yaml

from fastsparse.experiments.config import ConfigError, apply_overrides, load_yaml
from fastsparse.experiments.config.load import safe_yaml

GOOD = """seed: 0
data: {name: digits, batch_size: 256}
model: {name: mlp, sizes: [64, 32, 10]}
optimizer: {name: sgd, lr: 0.1}
epochs: 2
"""


@pytest.mark.parametrize("text, key, line", [
    (GOOD + "epochs: 3\n", "epochs", 6),                                         # top level
    (GOOD.replace("lr: 0.1}", "lr: 0.1, lr: 0.2}"), "lr", 4),                    # flow mapping
    (GOOD + "sparsity:\n  algorithm: rigl\n  update:\n    freq: 10\n    freq: 20\n", "freq", 10),  # nested block
    (GOOD + "sparsity:\n  - {algorithm: set}\n  - {algorithm: rigl, sparsity: 0.9, sparsity: 0.8}\n",
     "sparsity", 8),                                                             # inside a list
    (GOOD.replace("seed: 0", "seed: 0\n1: a\n1.0: b"), "1.0", 3),                # keys YAML types apart, Python merges
])
def test_a_duplicate_key_is_refused_with_its_line(tmp_path, text, key, line):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    message = str(info.value)
    assert f"duplicate key {key}" in message.replace("'", "") and f"line {line}," in message, message


def test_merge_keys_may_still_be_overridden():
    assert safe_yaml("a: &x {b: 1, c: 2}\nd: {<<: *x, b: 3}") == {"a": {"b": 1, "c": 2}, "d": {"b": 3, "c": 2}}


def test_same_key_in_two_mappings_is_fine():
    assert safe_yaml("a: {x: 1}\nb: {x: 2}") == {"a": {"x": 1}, "b": {"x": 2}}


def test_a_duplicate_key_in_a_set_value_is_refused():
    with pytest.raises(ConfigError, match="duplicate key 'freq'"):
        apply_overrides({}, ["sparsity.update={freq: 1, freq: 2}"])


def test_a_duplicate_key_in_a_rare_gems_config_is_refused():
    from fastsparse.experiments.convert import ConversionError, convert_with_notes

    with pytest.raises(ConversionError, match="duplicate key 'epochs'"):
        convert_with_notes("rare-gems", "epochs: 1\nepochs: 2\n")


def test_plain_yaml_would_have_kept_the_last_value_silently():
    # what the tests above guard against
    assert yaml.safe_load("epochs: 2\nepochs: 3\n") == {"epochs": 3}
