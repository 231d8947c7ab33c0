#!/usr/bin/env bash
# Pillow-SIMD for seer's CPU workers: build it once from PyPI's source archive and swap it in.
#
#   bash cluster/pillow_simd.sh install [VENV]        # `make simd`: Pillow -> Pillow-SIMD in VENV (.venv)
#   bash cluster/pillow_simd.sh remove [VENV]         # `make unsimd`: back to the Pillow it replaced
#   bash cluster/pillow_simd.sh overlay BASE NEW      # `make simd-venv`: NEW = BASE with Pillow-SIMD on top
#   bash cluster/pillow_simd.sh check [VENV]          # exit 0 only if VENV imports a working Pillow-SIMD
#   bash cluster/pillow_simd.sh target                # what this CPU gets: avx2 / sse4, or why not
#
# Pillow-SIMD is a drop-in fork of Pillow (SIMD resize, filters, conversions). PyPI has only its
# source archive, and it installs the same `PIL` package as Pillow, so it cannot sit beside Pillow
# as an extra: `install` uninstalls Pillow and installs the Pillow-SIMD wheel with --no-deps (pip's
# resolver would otherwise put Pillow back over it; so does any later `pip install` that wants
# "pillow", e.g. `make venv` after pyproject.toml changed: run `make simd` again after it).
#
# The build: the CPU's flags decide (/proc/cpuinfo): AVX2 -> CC="cc -mavx2" (the only variant
# faster than current Pillow); SSE4.1 without AVX2 -> the plain SSE4 build, with a warning that it
# is no faster; anything else (no x86-64, no SSE4.1) -> refused, saying why. Needed headers: Python,
# libjpeg(-turbo), zlib and libwebp (seer stores WebP samples as they are; a PIL without WebP
# would reject them); libtiff optional. Missing ones are installed with apt-get where that works
# (root, Debian/Ubuntu), else named. The wheel (~80 s to build) is kept in
# SIMD_CACHE/<avx2|sse4>/ (default .cache/pillow-simd) and reused by later installs.
#
# Environment: PILLOW_SIMD_VERSION (default 12.1.1.post0), SIMD_CACHE.
set -euo pipefail

VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}
CACHE=${SIMD_CACHE:-.cache/pillow-simd}
BUILD_DEPS="libjpeg-dev zlib1g-dev libwebp-dev libtiff-dev"

say() { echo "pillow_simd: $*"; }
fail() { echo "pillow_simd: error: $*" >&2; exit 1; }

venv_python() {  # the venv's interpreter, or one clear line
    [[ -x "$1/bin/python" ]] || fail "no venv at $1 (no $1/bin/python): run \`make venv\` first"
    echo "$1/bin/python"
}

# Sets CC_FLAGS and TARGET from the CPU, or refuses.
# (PILLOW_SIMD_ARCH and PILLOW_SIMD_CPUINFO stand in for `uname -m` and /proc/cpuinfo in tests.)
cpu_target() {
    local arch flags cpuinfo=${PILLOW_SIMD_CPUINFO:-/proc/cpuinfo}
    arch=${PILLOW_SIMD_ARCH:-$(uname -m)}
    [[ "$arch" == x86_64 ]] || fail "Pillow-SIMD is SSE4/AVX2 code for x86-64 and this CPU is $arch; stay on Pillow"
    [[ -r "$cpuinfo" ]] || fail "cannot read $cpuinfo to see the CPU's SIMD flags; stay on Pillow"
    flags=" $(grep -m1 '^flags' "$cpuinfo" | cut -d: -f2) "
    if [[ "$flags" == *" avx2 "* ]]; then
        TARGET=avx2 CC_FLAGS="-mavx2"
    elif [[ "$flags" == *" sse4_1 "* ]]; then
        TARGET=sse4 CC_FLAGS=""
        say "warning: this CPU has no AVX2; using the SSE4 variant, which is no faster than current Pillow" >&2
    else
        fail "this CPU has neither AVX2 nor SSE4.1, which Pillow-SIMD needs; stay on Pillow"
    fi
}

have_header() { echo "#include <$1>" | cc -E -x c - >/dev/null 2>&1; }

# Makes sure the C headers the build needs are there (apt-get where possible).
build_deps() {
    local py=$1 include missing=()
    command -v cc >/dev/null 2>&1 || fail "no C compiler (cc): install gcc (Debian: apt-get install gcc)"
    include=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [[ -f "$include/Python.h" ]] || fail "no Python.h in $include: install your Python's development headers"
    for h in jpeglib.h zlib.h webp/decode.h webp/mux.h tiffio.h; do have_header "$h" || missing+=("$h"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing build dependencies ($BUILD_DEPS) for: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $BUILD_DEPS >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $BUILD_DEPS >/dev/null; } \
            || fail "apt-get could not install $BUILD_DEPS"
    fi
    for h in jpeglib.h zlib.h webp/decode.h webp/mux.h; do
        have_header "$h" || fail "missing C header $h: install $BUILD_DEPS (Debian/Ubuntu names) and run again"
    done
    have_header tiffio.h || say "warning: no tiffio.h: this Pillow-SIMD will not read TIFF (install libtiff-dev)" >&2
}

# Prints the path of a Pillow-SIMD wheel for $1's Python, building it if it is not cached yet.
wheel_for() {
    local py=$1 tag dir wheel tmp
    cpu_target
    tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    dir="$CACHE/$TARGET"
    wheel=$(ls "$dir"/pillow_simd-"$VERSION"-"$tag"-*.whl 2>/dev/null | head -n1 || true)
    if [[ -z "$wheel" ]]; then
        build_deps "$py" >&2
        say "building pillow-simd $VERSION ($TARGET, CC=\"cc $CC_FLAGS\"), about 80-100 s" >&2
        mkdir -p "$dir"
        tmp=$(mktemp -d)
        # --no-cache-dir: pip's wheel cache would hand back a build made with other CC flags
        CC="cc $CC_FLAGS" "$py" -m pip wheel -q --no-deps --no-binary :all: --no-cache-dir \
            "pillow-simd==$VERSION" -w "$tmp" >&2 || { rm -rf "$tmp"; fail "building pillow-simd $VERSION failed (see pip's output above)"; }
        mv "$tmp"/pillow_simd-*.whl "$dir"/ && rm -rf "$tmp"
        wheel=$(ls "$dir"/pillow_simd-"$VERSION"-"$tag"-*.whl | head -n1)
    fi
    echo "$wheel"
}

# Exit 0 and one line if $1's python imports Pillow-SIMD that decodes JPEG, PNG and WebP.
verify() {
    "$1" - "$VERSION" <<'EOF'
import importlib.metadata as md, sys
from pathlib import Path
import PIL
from PIL import features
want = sys.argv[1]
try:
    dist = md.distribution("pillow-simd")
except md.PackageNotFoundError:
    sys.exit(f"pillow_simd: error: {sys.executable} imports PIL {PIL.__version__} from {PIL.__file__}, not Pillow-SIMD")
here = Path(PIL.__file__).resolve()
if PIL.__version__ != want or dist.version != want or Path(str(dist.locate_file("PIL/__init__.py"))).resolve() != here:
    sys.exit(f"pillow_simd: error: PIL {PIL.__version__} from {here} is not the Pillow-SIMD {want} build")
lacking = [f for f in ("jpg", "zlib", "webp") if not features.check(f)]
if lacking:
    sys.exit(f"pillow_simd: error: this Pillow-SIMD build lacks {', '.join(lacking)} support")
from PIL import _imaging
built = "AVX2" if b"-mavx2" in Path(_imaging.__file__).read_bytes() else "SSE4"
print(f"pillow_simd: {sys.prefix} imports Pillow-SIMD {PIL.__version__} ({built} build, libjpeg-turbo "
      f"{features.version('libjpeg_turbo')}, WebP {features.version('webp')})")
EOF
}

cmd_install() {
    local venv=${1:-.venv} py wheel old
    py=$(venv_python "$venv")
    if verify "$py" >/dev/null 2>&1; then verify "$py"; say "already installed in $venv"; return 0; fi
    wheel=$(wheel_for "$py")
    old=$("$py" -c 'import importlib.metadata as m; print(m.version("pillow"))' 2>/dev/null || true)
    [[ -n "$old" ]] && echo "$old" >"$venv/.pillow-before-simd"
    "$py" -m pip uninstall -y -q pillow >/dev/null 2>&1 || true
    "$py" -m pip install -q --no-deps --force-reinstall "$wheel"
    verify "$py" || { cmd_remove "$venv"; fail "Pillow-SIMD did not work in $venv; Pillow is back"; }
    say "undo with \`make unsimd\`; a later \`pip install\` that wants pillow puts Pillow back (then \`make simd\` again)"
}

cmd_remove() {
    local venv=${1:-.venv} py spec
    py=$(venv_python "$venv")
    if ! "$py" -c 'import importlib.metadata as m; m.version("pillow-simd")' >/dev/null 2>&1; then
        say "no Pillow-SIMD in $venv: nothing to undo"
        return 0
    fi
    spec="pillow>=10"
    [[ -s "$venv/.pillow-before-simd" ]] && spec="pillow==$(cat "$venv/.pillow-before-simd")"
    "$py" -m pip uninstall -y -q pillow-simd >/dev/null 2>&1 || true
    "$py" -m pip install -q --no-deps --force-reinstall "$spec"
    rm -f "$venv/.pillow-before-simd"
    "$py" -c 'import PIL; print(f"pillow_simd: back on Pillow {PIL.__version__}")'
}

# NEW: a venv with only Pillow-SIMD of its own, that sees everything else from BASE (torch
# included, no second 5.5 GB copy). A .pth file in NEW's site-packages runs site.addsitedir on
# BASE's site-packages: .pth entries go *after* NEW's own site-packages on sys.path, so NEW's PIL
# shadows BASE's Pillow, and addsitedir (not a bare path line) also runs BASE's own .pth files
# (seer's editable install). pip comes from BASE too and installs into NEW (sys.prefix).
cmd_overlay() {
    local base=${1:-} new=${2:-} py site_base site_new wheel
    [[ -n "$base" && -n "$new" ]] || fail "usage: bash cluster/pillow_simd.sh overlay BASE_VENV NEW_VENV"
    py=$(venv_python "$base")
    wheel=$(wheel_for "$py")
    rm -rf "$new"
    "$py" -m venv --without-pip "$new"
    site_base=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    site_new=$("$new/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    site_base=$(cd "$site_base" && pwd -P)
    printf 'import site; site.addsitedir(%s)\n' "'$site_base'" >"$site_new/_seer_base_venv.pth"
    "$new/bin/python" -m pip install -q --no-deps "$wheel"
    verify "$new/bin/python"
}

case "${1:-}" in
    install) cmd_install "${2:-}" ;;
    remove) cmd_remove "${2:-}" ;;
    overlay) cmd_overlay "${2:-}" "${3:-}" ;;
    check) PY=$(venv_python "${2:-.venv}"); verify "$PY" ;;
    target) cpu_target && echo "$TARGET CC=\"cc $CC_FLAGS\"" ;;
    *) fail "usage: bash cluster/pillow_simd.sh install|remove|check [VENV] | overlay BASE_VENV NEW_VENV | target" ;;
esac
