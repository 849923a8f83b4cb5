#!/usr/bin/env bash
# Set-up for cnclip on Debian 12, as root. Idempotent: a second run checks and returns quickly.
#
#   1. apt: the native build dependencies (cmake + OpenBLAS for vendored FAISS, nasm for the
#      vendored libjpeg-turbo (the JPEG decoder Pillow uses), a C++ compiler
#      for tch's libtorch bindings and LMDB, binutils' readelf for a linkage test, lmdb-utils
#      (mdb_stat, mdb_dump, mdb_copy) to check the LMDBs we write with LMDB's own tools), strace
#      (a test stops a job with a signal at one exact system call).
#   2. A Python venv (default: .venv in the repository; CNCLIP_VENV=DIR puts it elsewhere and
#      links .venv to it) with torch, torchvision and cn_clip pinned together. torch's wheel is
#      also our libtorch: .venv/libtorch links to its `torch/` folder, and .cargo/config.toml
#      points LIBTORCH there, so a plain `cargo build` / `cargo test` needs no exported variable.
#   3. The tools the tests start: s3s-fs, a real S3-compatible object store server (crates.io,
#      pinned: 0.15 needs a newer rustc), built once into CNCLIP_TOOLS (default: .tools in the
#      repository; elsewhere, linked as .tools, as the venv is).
#   4. cargo fetch, so the first build needs no network.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${CNCLIP_VENV:-$root/.venv}
tools=${CNCLIP_TOOLS:-$root/.tools}
s3s_version=0.14.1
requirements=$root/scripts/requirements.txt
apt_packages=(cmake libopenblas-dev pkg-config g++ make nasm binutils lmdb-utils strace)

log() { printf 'setup: %s\n' "$*" >&2; }

# --- 1. apt ---------------------------------------------------------------------------------
missing=()
for package in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    missing+=(python3-venv)
fi
if ((${#missing[@]})); then
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "apt packages present"
fi
command -v cargo >/dev/null || { log "cargo not found: install Rust (rustup, stable >= 1.94) first"; exit 1; }

# --- 2. Python venv -------------------------------------------------------------------------
stamp=$venv/.cnclip-requirements
wanted="$(python3 --version 2>&1) $(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ -f $stamp && "$(cat "$stamp")" == "$wanted" && -x $venv/bin/python ]]; then
    log "venv $venv up to date"
else
    log "creating venv $venv (torch wheel: ~2.7 GB on first download)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
    echo "$wanted" >"$stamp"
fi
if [[ $venv != "$root/.venv" ]]; then
    if [[ -e $root/.venv && ! -L $root/.venv ]]; then
        log "$root/.venv exists and is not a link to $venv: remove it or unset CNCLIP_VENV"
        exit 1
    fi
    ln -sfn "$venv" "$root/.venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[[ -f $site/torch/lib/libtorch_cpu.so ]] || { log "torch wheel has no lib/libtorch_cpu.so under $site/torch"; exit 1; }
ln -sfn "${site#"$venv"/}/torch" "$venv/libtorch"

# --- 3. tools -------------------------------------------------------------------------------
if [[ "$("$tools/s3s-fs/bin/s3s-fs" --version 2>/dev/null)" == "s3s-fs $s3s_version" ]]; then
    log "s3s-fs $s3s_version present in $tools"
else
    log "building s3s-fs $s3s_version into $tools (about 2.5 min)"
    mkdir -p "$tools"
    CARGO_TARGET_DIR="$tools/.build" cargo install --quiet --locked --root "$tools/s3s-fs" \
        "s3s-fs@$s3s_version" --features binary
    rm -rf "$tools/.build"
fi
if [[ $tools != "$root/.tools" ]]; then
    if [[ -e $root/.tools && ! -L $root/.tools ]]; then
        log "$root/.tools exists and is not a link to $tools: remove it or unset CNCLIP_TOOLS"
        exit 1
    fi
    ln -sfn "$tools" "$root/.tools"
fi

# --- 4. crates ------------------------------------------------------------------------------
(cd "$root" && cargo fetch --quiet)
log "done: cargo build / cargo test now find libtorch at $venv/libtorch"
