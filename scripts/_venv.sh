# Sourced by scripts/test and scripts/example: make sure .venv exists.
# Debian's python3 lacks ensurepip until python3-venv is installed.

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root to run: $* (not root and no sudo)" >&2
        return 1
    fi
}

ensure_venv() {
    if [[ -x .venv/bin/python && -x .venv/bin/pip ]]; then
        return
    fi
    if ! python3 -m venv .venv; then
        rm -rf .venv
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
        python3 -m venv .venv
    fi
}
