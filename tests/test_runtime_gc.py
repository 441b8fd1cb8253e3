"""protocol.runtime.tune_gc: frozen start-up objects and raised thresholds, or CPython's defaults
when HAUSMEISTER_GC=default.  Each case runs in a fresh interpreter (freezing is for life)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import gc, json; from protocol.runtime import tune_gc; said = tune_gc(); "
         "print(json.dumps([said, gc.get_threshold(), gc.get_freeze_count()]))")


def probe(env_value: str | None):
    env = {k: v for k, v in os.environ.items() if k != "HAUSMEISTER_GC"}
    if env_value is not None:
        env["HAUSMEISTER_GC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return json.loads(out)


def test_tune_gc_freezes_start_up_objects_and_raises_the_thresholds():
    said, thresholds, frozen = probe(None)
    assert thresholds == [50_000, 50, 100]
    assert frozen > 1000 and f"{frozen} start-up objects frozen" in said


def test_generation_0_threshold_from_the_environment():
    _, thresholds, frozen = probe("20000")
    assert thresholds == [20_000, 50, 100] and frozen > 1000


@pytest.mark.parametrize("value", ["default"])
def test_default_leaves_the_collector_alone(value):
    said, thresholds, frozen = probe(value)
    assert thresholds == [700, 10, 10] and frozen == 0 and said.startswith("default")


@pytest.mark.parametrize("value", ["lots", "-5", "0", "１２"])
def test_a_bad_setting_is_named_in_the_log_and_the_defaults_hold(value):
    said, thresholds, frozen = probe(value)
    assert thresholds == [50_000, 50, 100] and frozen > 1000
    assert f"HAUSMEISTER_GC={value!r} ignored" in said
