# make train: set up .venv and train with the preset for this machine, then sample.
# make test:  set up .venv and run the test suite.
PY := .venv/bin/python

.PHONY: train sample test data

train: .venv/ready data
	$(PY) train.py

sample: .venv/ready
	$(PY) sample.py --trajectory

test: .venv/ready
	$(PY) -m pytest -q

.venv/ready: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Debian and Ubuntu ship Fashion-MNIST as a package; elsewhere train.py downloads it.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && apt-get install -y -q dataset-fashion-mnist; fi
