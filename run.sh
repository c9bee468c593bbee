#!/usr/bin/env bash
# ./run.sh        set up .venv/, then train and test (on generated demo images when
#                 ./data/train is absent); extra arguments go to main.py.
# ./run.sh test   set up .venv/ with the test tools and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
    test)
        shift
        bash scripts/setup.sh --dev
        exec .venv/bin/python -m pytest tests "$@"
        ;;
    *)
        bash scripts/setup.sh
        if [ -d data/train ]; then
            .venv/bin/python main.py train "$@"
            exec .venv/bin/python main.py test "$@"
        fi
        echo "no ./data/train: running the demo on generated images"
        exec .venv/bin/python main.py demo "$@"
        ;;
esac
