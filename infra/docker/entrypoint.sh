#!/usr/bin/env bash
# Entry point of the SSD training image (infra/docker/Dockerfile): checks, then `exec "$@"`.
#
# It runs the given command as PID 1's replacement, so signals reach it directly:
#   docker run ... IMAGE ray start --address=HEAD_IP:6379 --block      a Ray worker node
#   docker run ... IMAGE ray start --head --dashboard-host=127.0.0.1 --block
#   docker run ... IMAGE python -m pipeline check-params --params infra/params/gpu_ssd300_voc.yaml
#   docker run ... IMAGE                                                an interactive shell (CMD is bash)
# The Ray cluster launcher starts the container with `bash` and runs its commands through `docker exec`;
# KubeRay replaces the entry point with its own `ray start` command. Neither depends on this script.
#
# Checks, each failing fast with a message instead of a confusing error later:
#   - not root (the image runs as `ray`, uid 1000); SSD_ALLOW_ROOT=1 overrides, for debugging only;
#   - with RAY_AUTH_MODE=token, a `ray ...` command has a token: RAY_AUTH_TOKEN, or a readable non-empty
#     RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token. Without one, `ray start --head` would make up its own token
#     and the other nodes and clients could not join.
set -euo pipefail

readonly EX_USAGE=64 EX_CONFIG=78  # sysexits.h

die() {
    local code=$1
    shift
    echo "ssd-entrypoint: $*" >&2
    exit "$code"
}

if [[ "$(id -u)" == "0" && "${SSD_ALLOW_ROOT:-0}" != "1" ]]; then
    die "$EX_USAGE" "refusing to run as root; the image's user is 'ray' (uid 1000). Drop '--user root' /" \
        "'runAsUser: 0', or set SSD_ALLOW_ROOT=1 to debug."
fi

if [[ $# -eq 0 ]]; then
    set -- bash
fi

has_ray_token() {
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        return 0
    fi
    local path="${RAY_AUTH_TOKEN_PATH:-${HOME:-/home/ray}/.ray/auth_token}"
    [[ -r "$path" && -s "$path" ]]
}

if [[ "$1" == "ray" && "${RAY_AUTH_MODE:-}" == "token" ]] && ! has_ray_token; then
    die "$EX_CONFIG" "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN (from a secret), or" \
        "RAY_AUTH_TOKEN_PATH to a readable non-empty file (now: '${RAY_AUTH_TOKEN_PATH:-~/.ray/auth_token}')." \
        "Every node and client of one cluster must share the same token (see infra/README.md)."
fi

# Ray opens many sockets and files; raise the soft limit as far as the hard limit allows.
ulimit -n "$(ulimit -H -n)" 2>/dev/null || true

exec "$@"
