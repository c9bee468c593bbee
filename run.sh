#!/usr/bin/env bash
# ./run.sh        set up .venv/, then train and test (on generated demo images when
#                 ./data/train is absent); extra arguments go to main.py. Plots go to a
#                 Visdom server on --vis_port, started (and stopped) here if none runs.
# ./run.sh test   set up .venv/ with the test tools and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
    test)
        shift
        bash scripts/test_deps.sh
        bash scripts/setup.sh --dev
        exec .venv/bin/python -m pytest tests "$@"
        ;;
    *)
        bash scripts/setup.sh
        with_visdom=(.venv/bin/python -m utils.visdom_server)
        if [ -d data/train ]; then
            exec "${with_visdom[@]}" bash -c '.venv/bin/python main.py train "$@" &&
                .venv/bin/python main.py test "$@"' run.sh "$@"
        fi
        echo "no ./data/train: running the demo on generated images"
        exec "${with_visdom[@]}" .venv/bin/python main.py demo "$@"
        ;;
esac
