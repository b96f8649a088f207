#!/bin/bash
# On the lent machine, first thing in every call: the carried wheels into /tmp/site, this project
# installed editable (its entry points). Source it: `. bench/device/prepare.sh`.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
