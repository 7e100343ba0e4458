#!/usr/bin/env bash
# Run the whole test suite on real ARM kernels: full-system qemu (TCG) boots
# Debian's arm64 and armmp-lpae kernels with an initramfs that holds a
# Debian root, the wheels scripts/arm_wheels.sh built, and this tree's
# tests.  Unlike qemu-user (where the kernel is the host's and TCP_INFO is
# 4 bytes), the guest's own ARM kernel answers every socket call.  See
# docs/arm.md.
#
#   scripts/arm_kernels.sh [pytest args...]
#       default pytest args: -q -rfEs --durations=15 tests   (slow and netns tests included)
#
# How:
#   1. mmdebstrap --variant=extract makes, per target, a user root (python3,
#      cffi backend, pytest, pytest-timeout, hypothesis, iproute2, nftables,
#      kmod, procps, busybox, ...) and a kernel root (the linux-image
#      package).  depmod runs here (extract skips maintainer scripts); only
#      the modules the tests load are kept (veth, nf_tables, the *_diag
#      modules, sch_netem, dummy, and what they depend on).  Both are packed
#      into one uncompressed newc cpio, cached with the kernel.
#   2. Each run packs a small cpio on top: /init (busybox sh: mounts, ulimit,
#      lo up, modprobe, pytest [+ a rerun of failed tests], "FASTLIVE_VM_EXIT=<rc>", poweroff), the
#      wheel unzipped into /usr/local/lib/python3.X/dist-packages (with its
#      console scripts), and this tree without fastlive/ in /fastlive, so the
#      wheel is what the tests import.
#   3. Both VMs boot at once (nice -n 10), each with a hard time cap; each
#      log is printed whole when done, then one closing line per target.
#
# Targets (FASTLIVE_KERNEL_TARGETS, default "arm64 armhf"):
#   arm64       Debian 12 linux-image-arm64 (6.1), qemu-system-aarch64 -M virt -cpu cortex-a57
#   armhf       Debian 12 linux-image-armmp-lpae (6.1), qemu-system-arm -M virt -cpu cortex-a15
#   amd64-5.10  Debian 11's linux-image-amd64 (5.10) under a Debian 12 user
#               root, qemu-system-x86_64 (KVM when /dev/kvm works), with a
#               wheel built here by pip for x86_64
#
# Environment:
#   FASTLIVE_ARM_CACHE       cache dir, shared with arm_wheels.sh (/var/cache/fastlive-arm);
#                            roots and kernels go to <cache>/vm
#   FASTLIVE_KERNEL_TARGETS  see above
#   FASTLIVE_ARM_OUT         where arm_wheels.sh put the wheels (<repo>/wheelhouse);
#                            missing or older than the sources: arm_wheels.sh is run
#                            (smoke test only) to make them
#   FASTLIVE_VM_TIMEOUT      hard cap per VM in seconds (900)
#   FASTLIVE_VM_MEM, FASTLIVE_VM_SMP   guest RAM in MiB (2048) and CPUs (2)
#   FASTLIVE_DEBIAN_MIRROR   Debian mirror (http://deb.debian.org/debian)
#
# In the guest, a first pytest pass that fails (exit code 1) is followed
# by one rerun of just the failed tests (pytest --lf) in the same boot; the
# rerun's exit code counts, and the closing lines of both passes are
# printed (per target, at the end) so a flaky test stays visible.
#
# Exit 0 with "SKIP: ..." only when apt / the Debian mirror cannot be
# reached or the host is not an x86_64 Debian; tests that fail (after the
# rerun) exit 1; exit 75 when nothing failed but a VM ended before pytest's
# closing line (crash, time cap): those targets are listed in
# <cache>/vm/work/unfinished, to run again with FASTLIVE_KERNEL_TARGETS.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cache=${FASTLIVE_ARM_CACHE:-/var/cache/fastlive-arm}
vmc=$cache/vm
targets=${FASTLIVE_KERNEL_TARGETS:-arm64 armhf}
mirror=${FASTLIVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
out=${FASTLIVE_ARM_OUT:-$top/wheelhouse}
vm_timeout=${FASTLIVE_VM_TIMEOUT:-900}
vm_mem=${FASTLIVE_VM_MEM:-2048}
vm_smp=${FASTLIVE_VM_SMP:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore DEBIAN_FRONTEND=noninteractive
t0=$SECONDS

say()  { printf '== arm_kernels [%3ds] %s\n' $((SECONDS - t0)) "$*"; }
skip() { printf 'SKIP: arm_kernels: %s\n' "$*"; exit 0; }
die()  { printf 'FAIL: arm_kernels: %s\n' "$*" >&2; exit 1; }

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

# ------------------------------------------------------------------ targets
# target -> "debian-arch user-suite kernel-suite kernel-package qemu machine-args console wheel-glob"
declare -A T=(
    [arm64]="arm64 bookworm bookworm linux-image-arm64 qemu-system-aarch64 -M|virt|-cpu|cortex-a57 ttyAMA0 *_aarch64.whl"
    [armhf]="armhf bookworm bookworm linux-image-armmp-lpae qemu-system-arm -M|virt|-cpu|cortex-a15 ttyAMA0 *_armv7l.whl"
    [amd64-5.10]="amd64 bookworm bullseye linux-image-amd64 qemu-system-x86_64 -M|q35 ttyS0 *_x86_64.whl"
)
for t in $targets; do
    [ -n "${T[$t]+x}" ] || die "unknown target $t (known: ${!T[*]})"
done
field() { local -a f; read -r -a f <<<"${T[$1]}"; echo "${f[$2]}"; }

# Modules the tests need (with their dependencies); missing or built-in ones
# are fine.  The guest loads them all at boot.
MODULES="veth dummy sch_netem nf_tables nft_ct nft_reject_inet nft_limit nft_log \
inet_diag tcp_diag udp_diag raw_diag unix_diag netlink_diag af_packet_diag"
PKGS_USER=python3,python3-cffi-backend,python3-pytest,python3-pytest-timeout,python3-hypothesis,iproute2,nftables,kmod,busybox,procps,coreutils,dash,util-linux,netbase
ROOT_FORMAT=1   # bump when the way the extracts are made changes
IMG_FORMAT=2    # bump when the way the cached cpio is made changes

# ---------------------------------------------------------------- host side
case $(uname -m) in
    x86_64) ;;
    *) skip "host is $(uname -m); this script runs from an x86_64 Debian host";;
esac
command -v apt-get >/dev/null || skip "no apt-get: not a Debian-like host"

need=()
for tool in mmdebstrap:mmdebstrap cpio:cpio depmod:kmod; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
for t in $targets; do
    q=$(field "$t" 4)
    case $q in
        qemu-system-x86_64) pkg=qemu-system-x86 ;;
        *) pkg=qemu-system-arm ;;
    esac
    command -v "$q" >/dev/null || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    [ "$(id -u)" = 0 ] || skip "needs ${need[*]} and is not root (cannot apt-get install)"
    say "apt-get install ${need[*]}"
    if ! { apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null 2>&1 ||
           { apt-get update -qq -o DPkg::Lock::Timeout=300 &&
             apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null; }; }; then
        why=$(mirror_reachable bookworm) || skip "apt cannot reach the Debian mirror: $why"
        die "apt-get install ${need[*]} failed (the mirror is reachable)"
    fi
fi
[ "$(id -u)" = 0 ] || skip "not root: the roots are extracted as root (device nodes, owners)"

# ------------------------------------------------------------------ wheels
# The wheels scripts/arm_wheels.sh left in $out; made (smoke test only)
# when missing or older than the sources they are built from.
newest_src=$(cd "$top" && find fastlive csrc build_ffi.py setup.py pyproject.toml -type f \
             \( -name '*.py' -o -name '*.c' -o -name '*.h' -o -name '*.toml' -o -name '*.pyi' \) \
             -printf '%T@\n' 2>/dev/null | sort -n | tail -1) || true
wheel_for() {  # glob -> newest wheel in $out matching, or nothing
    local w
    w=$(ls -t "$out"/fastlive-$1 2>/dev/null | head -1) || true
    [ -n "$w" ] || return 0
    if [ "$(stat -c %Y "$w")" -lt "${newest_src%.*}" ]; then return 0; fi
    echo "$w"
}
declare -A wheel=()
arm_missing=()
for t in $targets; do
    a=$(field "$t" 0)
    case $a in
        arm64|armhf)
            wheel[$t]=$(wheel_for "$(field "$t" 7)")
            [ -n "${wheel[$t]}" ] || arm_missing+=("$a") ;;
    esac
done
if [ ${#arm_missing[@]} -gt 0 ]; then
    say "no current ${arm_missing[*]} wheel in $out: scripts/arm_wheels.sh (smoke test only)"
    set +e
    wout=$(FASTLIVE_ARM_ARCHS="${arm_missing[*]}" FASTLIVE_ARM_SMOKE_SUITES='' FASTLIVE_ARM_OUT="$out" \
           bash "$top/scripts/arm_wheels.sh" -q tests/test_smoke.py 2>&1)
    wrc=$?
    set -e
    printf '%s\n' "$wout" | sed 's/^/   | /'
    [ $wrc = 0 ] || die "scripts/arm_wheels.sh failed"
    case $wout in *SKIP:*) skip "arm_wheels.sh skipped: no wheels";; esac
    for t in $targets; do
        case $(field "$t" 0) in arm64|armhf) ;; *) continue;; esac
        wheel[$t]=$(wheel_for "$(field "$t" 7)")
        [ -n "${wheel[$t]}" ] || die "arm_wheels.sh made no $(field "$t" 7) in $out"
    done
fi

# A copy of the tracked (and new, unignored) files: no build products.
copy_tree() {  # dest
    if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
        (cd "$top" && git ls-files -co --exclude-standard -z) |
            (cd "$top" && xargs -0 cp --parents -t "$1" 2>/dev/null || true)
    else
        tar -C "$top" --exclude=.git --exclude=build --exclude=dist --exclude=wheelhouse -cf - . |
            tar -C "$1" -xf -
    fi
}

mkdir -p "$vmc"
exec 9>"$vmc/.lock"
flock -w 1800 9 || die "another arm_kernels.sh holds $vmc/.lock"
work=$vmc/work       # per target: the run's cpio and console log (kept until its next run)
mkdir -p "$work"
for t in $targets; do rm -rf "${work:?}/$t" "$work/image-$t.log"; done
rm -rf "$work/src-amd64" "$work/wheel-amd64"

for t in $targets; do      # x86_64: a native pip wheel of this tree
    [ "$(field "$t" 0)" = amd64 ] || continue
    say "build the x86_64 wheel (pip wheel, host Python)"
    src=$work/src-amd64; mkdir -p "$src"
    copy_tree "$src"
    find "$src" \( -name '*.so' -o -name '*.o' -o -name __pycache__ -o -name '*.egg-info' -o -name build \) \
        -prune -exec rm -rf {} +
    (cd "$src" && python3 -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheel-amd64" .) \
        >"$work/wheel-amd64.log" 2>&1 || { cat "$work/wheel-amd64.log" >&2; die "x86_64 wheel build failed"; }
    wheel[$t]=$(ls "$work/wheel-amd64"/fastlive-*.whl)
done

# ------------------------------------------------------- roots and kernels
extract() {  # suite arch packages dir -> cached mmdebstrap extract
    local s=$1 a=$2 pkgs=$3 dir=$4
    local stamp="format=$ROOT_FORMAT suite=$s arch=$a pkgs=$pkgs mirror=$mirror"
    if [ -f "$dir/.fastlive-root" ] && [ "$(cat "$dir/.fastlive-root")" = "$stamp" ]; then
        return 0
    fi
    rm -rf "$dir" "$dir.tmp"
    local try
    for try in 1 2; do
        mmdebstrap --variant=extract --architectures="$a" --include="$pkgs" \
            "$s" "$dir.tmp" "$mirror" </dev/null >"$dir.log" 2>&1 && break
        rm -rf "$dir.tmp"
        [ $try = 2 ] && return 1
        sleep 5
    done
    local d
    for d in bin sbin lib lib64; do     # merged /usr (extract leaves it to a hook)
        [ -e "$dir.tmp/$d" ] || [ ! -d "$dir.tmp/usr/$d" ] || ln -s "usr/$d" "$dir.tmp/$d"
    done
    echo "$stamp" > "$dir.tmp/.fastlive-root"
    mv "$dir.tmp" "$dir"
}

# Module closure: the wanted modules and everything they depend on (hard
# dependencies from modules.dep, soft ones from modules.softdep, resolved
# through modules.alias), by the indexes depmod wrote for the full set.
module_closure() {  # moddir -> relative paths of the .ko files to keep
    python3 - "$1" $MODULES <<'EOF'
import fnmatch, os, sys
moddir, wanted = sys.argv[1], sys.argv[2:]
def name_of(path):
    return os.path.basename(path).split(".ko")[0].replace("-", "_")
deps = {}
with open(os.path.join(moddir, "modules.dep")) as f:
    for line in f:
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
by_name = {name_of(p): p for p in deps}
aliases = []
with open(os.path.join(moddir, "modules.alias")) as f:
    for line in f:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            aliases.append((parts[1], parts[2].replace("-", "_")))
soft = {}
try:
    with open(os.path.join(moddir, "modules.softdep")) as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[0] == "softdep":
                soft[parts[1].replace("-", "_")] = [w for w in parts[2:] if not w.endswith(":")]
except FileNotFoundError:
    pass
def resolve(name):
    n = name.replace("-", "_")
    if n in by_name:
        return [by_name[n]]
    return [by_name[m] for pat, m in aliases if fnmatch.fnmatchcase(name, pat) and m in by_name]
keep, todo = set(), [p for w in wanted for p in resolve(w)]
while todo:
    p = todo.pop()
    if p in keep:
        continue
    keep.add(p)
    todo.extend(deps.get(p, []))
    for s in soft.get(name_of(p), []):
        todo.extend(resolve(s))
print("\n".join(sorted(keep)))
EOF
}

# One cached cpio per target: user root + kernel modules, and the kernel.
make_image() {  # target
    local t=$1 a s ks kpkg
    a=$(field "$t" 0); s=$(field "$t" 1); ks=$(field "$t" 2); kpkg=$(field "$t" 3)
    local img=$vmc/img-$t user=$vmc/roots/user-$s-$a kern=$vmc/roots/kernel-$ks-$a
    mkdir -p "$vmc/roots"
    extract "$s" "$a" "$PKGS_USER" "$user" &
    local p1=$!
    extract "$ks" "$a" "$kpkg" "$kern" &
    local p2=$! rc=0
    wait $p1 || rc=1
    wait $p2 || rc=1
    [ $rc = 0 ] || return 1
    local stamp
    stamp="format=$IMG_FORMAT $(cat "$user/.fastlive-root") | $(cat "$kern/.fastlive-root") | modules=$MODULES"
    if [ -f "$img/stamp" ] && [ "$(cat "$img/stamp")" = "$stamp" ]; then
        return 0
    fi
    rm -rf "$img" "$img.tmp"; mkdir -p "$img.tmp"
    local kver
    kver=$(ls "$kern/lib/modules" | sort -V | tail -1)
    [ -n "$kver" ] && [ -e "$kern/boot/vmlinuz-$kver" ] || { echo "no kernel in $kern" >&2; return 1; }
    cp "$kern/boot/vmlinuz-$kver" "$img.tmp/vmlinuz"
    echo "$kver" > "$img.tmp/kver"
    # the root: a copy of the user root without docs, plus the kept modules
    local r=$img.tmp/root
    cp -a "$user" "$r"
    # (perl comes with debconf, gconv with glibc: neither is used here; the
    # less to unpack, the sooner /init runs under TCG)
    rm -rf "${r:?}"/usr/share/{doc,man,info,locale,lintian,bug,perl,perl5} "$r"/var/cache/apt \
           "$r"/var/lib/apt/lists "$r"/usr/lib/*-linux-gnu*/{perl,gconv} "${r:?}/boot" "$r/.fastlive-root"
    depmod -b "$kern" "$kver"
    local md=lib/modules/$kver
    mkdir -p "$r/$md"
    cp "$kern/$md"/modules.{order,builtin,builtin.modinfo} "$r/$md/" 2>/dev/null || true
    module_closure "$kern/$md" > "$img.tmp/modules.txt"
    (cd "$kern/$md" && xargs -a "$img.tmp/modules.txt" cp --parents -t "$r/$md")
    depmod -b "$r" "$kver"
    # byte-compile with the host when it is the same Python (same magic)
    local pyv
    pyv=$(readlink "$r/usr/bin/python3")
    if [ "$(python3 -c 'import sys; print("python%d.%d" % sys.version_info[:2])')" = "$pyv" ]; then
        python3 -m compileall -q -j 0 "$r/usr/lib/$pyv" "$r/usr/lib/python3/dist-packages" \
            >/dev/null 2>&1 || true
    fi
    # newc, every directory before its files (find's order)
    (cd "$r" && find . | cpio -o -H newc -R 0:0 --quiet) > "$img.tmp/root.cpio"
    rm -rf "$r"
    echo "$pyv" > "$img.tmp/python"
    echo "$stamp" > "$img.tmp/stamp"
    mv "$img.tmp" "$img"
}

say "roots and kernels in $vmc (cached): $targets"
declare -A mk=()
for t in $targets; do
    make_image "$t" >"$work/image-$t.log" 2>&1 & mk[$t]=$!
done
for t in $targets; do
    wait "${mk[$t]}" && continue
    cat "$work/image-$t.log" >&2
    a=$(field "$t" 0)
    for s in $(field "$t" 1) $(field "$t" 2); do
        log=$vmc/roots/user-$s-$a.log; [ -f "$log" ] || log=$vmc/roots/kernel-$s-$a.log
        if ! mirror_reachable "$s" >/dev/null ||
           grep -qsE 'Could not (resolve|connect)|Temporary failure|timed out|unexpected size|Hash Sum mismatch|Failed to fetch|Mirror sync' \
               "$vmc"/roots/*-"$s-$a".log; then
            skip "the Debian mirror cannot serve $s/$a"
        fi
    done
    die "could not make the $t root/kernel (logs: $vmc/roots/*.log)"
done
for t in $targets; do say "  $t: Linux $(cat "$vmc/img-$t/kver"), $(du -m "$vmc/img-$t/root.cpio" | cut -f1) MiB root"; done

# ------------------------------------------------------------- one run each
[ $# -gt 0 ] || set -- -q -rfEs --durations=15 tests

make_run_cpio() {  # target pytest-args... -> $work/<target>/guest.cpio
    local t=$1 img=$vmc/img-$1 d=$work/$1
    shift
    local o=$d/overlay pyv
    pyv=$(cat "$img/python")
    mkdir -p "$o"/{dev,etc,fastlive,usr/local/bin,usr/local/lib/"$pyv"/dist-packages}
    mknod -m 600 "$o/dev/console" c 5 1
    # this tree without the package sources: the installed wheel is imported
    copy_tree "$o/fastlive"
    rm -rf "$o/fastlive/fastlive" "$o/fastlive/wheelhouse"
    find "$o/fastlive" \( -name '*.so' -o -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
    local tcg=1; [ "${accel[$t]}" != kvm ] || tcg=
    local site=$o/usr/local/lib/$pyv/dist-packages
    python3 -m zipfile -e "${wheel[$t]}" "$site"
    if [ "$(python3 -c 'import sys; print("python%d.%d" % sys.version_info[:2])')" = "$pyv" ]; then
        python3 -m compileall -q "$site" >/dev/null 2>&1 || true
    fi
    # console scripts, as pip would write them
    python3 - "$site" "$o/usr/local/bin" <<'EOF'
import configparser, glob, os, sys
site, bindir = sys.argv[1:]
for ep in glob.glob(os.path.join(site, "*.dist-info", "entry_points.txt")):
    cp = configparser.ConfigParser(delimiters=("=",))
    cp.optionxform = str
    cp.read(ep)
    if not cp.has_section("console_scripts"):
        continue
    for name, target in cp.items("console_scripts"):
        mod, _, func = target.strip().partition(":")
        path = os.path.join(bindir, name)
        with open(path, "w") as f:
            f.write(f"#!/usr/bin/python3\nimport sys\nfrom {mod} import {func}\n"
                    f"sys.exit({func}())\n")
        os.chmod(path, 0o755)
EOF
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$o/etc/hosts"
    echo fastlive-vm > "$o/etc/hostname"
    # extract runs no maintainer script: no /etc/passwd, /etc/group
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$o/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$o/etc/group"
    # a few numbers of this kernel for docs/arm.md, printed after pytest
    # (never changes the exit code; skipped with the reason if the API moved)
    cat > "$o/fastlive/.vm_facts.py" <<'EOF'
import platform, socket, statistics, threading, time
def line(what, value):
    print(f"fastlive-vm fact: {what}: {value}", flush=True)
line("kernel", f"Linux {platform.release()} {platform.machine()}")
def startup(*code):
    import subprocess, sys
    best = []
    for _ in range(3):
        t = time.monotonic()
        subprocess.run([sys.executable, *code], check=False, stdout=subprocess.DEVNULL)
        best.append(time.monotonic() - t)
    return f"{min(best):.2f} s (best of 3)"
line("python3 -c pass", startup("-c", "pass"))
line("python3 -c 'import fastlive'", startup("-c", "import fastlive"))
line("python3 -m fastlive --help", startup("-m", "fastlive", "--help"))
try:
    from fastlive import _platform, tcp_info
    from fastlive.keepalive import read_sysctl_defaults, retransmit_timeout
    line("TCP_INFO bytes", _platform.tcp_info_length())
    line("keepalive sysctls", read_sysctl_defaults())
    line("tcp_retries2 timeout (s)", retransmit_timeout())
except Exception as exc:
    line("keepalive defaults", f"n/a ({type(exc).__name__}: {exc})")
def rtts(answer):
    from fastlive.heartbeat import HeartbeatEngine
    with socket.create_server(("127.0.0.1", 0)) as lst:
        cli = socket.create_connection(lst.getsockname(), timeout=5)
        srv, _ = lst.accept()
    eng = HeartbeatEngine(tick=0.005)
    stop = answer(srv)
    try:
        eng.add(cli, 0.1, 3, rtt=True)
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            eng.wait(0.05)
        ms = sorted(s.rtt * 1e3 for s in eng.rtt)
        return (f"{len(ms)} PINGs, min {ms[0]:.3f} / median {statistics.median(ms):.3f} / "
                f"max {ms[-1]:.3f} ms (kernel srtt {tcp_info(cli).rtt} us)")
    finally:
        stop()
        eng.close()
        cli.close()
        srv.close()
def py_peer(srv):
    from fastlive.heartbeat import PyHeartbeatPeer
    peer = PyHeartbeatPeer()
    peer.add(srv)
    peer.start()
    return peer.close
def c_engine(srv):
    from fastlive.heartbeat import HeartbeatEngine
    eng = HeartbeatEngine(tick=0.005)
    eng.add(srv, 10.0, 3)
    done = threading.Event()
    t = threading.Thread(target=lambda: [eng.wait(0.02) for _ in iter(done.is_set, True)], daemon=True)
    t.start()
    def stop():
        done.set()
        t.join(5)
        eng.close()
    return stop
for name, answer in (("C engine <-> C engine", c_engine), ("C engine <-> PyHeartbeatPeer", py_peer)):
    try:
        line(f"heartbeat RTT on loopback, {name}", rtts(answer))
    except Exception as exc:
        line(f"heartbeat RTT, {name}", f"n/a ({type(exc).__name__}: {exc})")
EOF
    # pytest's arguments, NUL-separated (no shell quoting in the guest)
    printf '%s\0' "$@" > "$o/fastlive/.pytest-args"
    # The guest's pytest runs: the whole suite, then - only when that pass
    # ended with exit code 1 (tests failed or errored; not 2-5, which are
    # the harness's) - the failed tests once more (--lf) in the same boot.
    # The last-failed list lives in the cache plugin's dir on /tmp (tmpfs).
    # pyproject's addopts disables that plugin, and pytest cannot enable a
    # plugin again once blocked ("-p cacheprovider" after it: "option names
    # --lf already added"), so the guest passes pyproject's addopts itself,
    # without "-p no:cacheprovider", and "-o addopts=" for pytest's
    # (the same for arguments given to this script).  Both passes' closing lines are printed as
    # "fastlive-vm pass: ..." lines for the host's summary; the exit code is
    # the rerun's when there was one.
    cat > "$o/fastlive/.vm_pytest.py" <<'EOF'
import json, os, re, shlex, subprocess, sys, tomllib
args = [os.fsdecode(a) for a in open(".pytest-args", "rb").read().split(b"\0")[:-1]]
try:
    with open("pyproject.toml", "rb") as f:
        addopts = tomllib.load(f)["tool"]["pytest"]["ini_options"].get("addopts", "")
except (OSError, KeyError, ValueError):
    addopts = ""
keep = []
it = iter([*(shlex.split(addopts) if isinstance(addopts, str) else addopts), *args])
for a in it:                     # the rerun needs the cache plugin
    if a in ("-pno:cacheprovider", "-p=no:cacheprovider"):
        continue
    if a == "-p":
        b = next(it, None)
        if b != "no:cacheprovider" and b is not None:
            keep += [a, b]
        continue
    keep.append(a)
cache = "/tmp/fastlive-pytest-cache"
base = [sys.executable, "-m", "pytest", "-o", "addopts=", "-o", f"cache_dir={cache}"]
closing = re.compile(rb"^(=+ )?[0-9]+ (passed|failed|error|errors|skipped|deselected)\b.* in [0-9.]+s|"
                     rb"^(=+ )?no tests ran")
def run(extra):
    """pytest, its output passed through to the console as it comes; ->
    (exit code, its closing line)."""
    p = subprocess.Popen(base + extra + keep, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = b""
    last = b""
    while True:
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        os.write(1, chunk)
        tail = (tail + chunk)[-200000:]
        lines = tail.split(b"\n")
        tail = lines[-1]
        for line in lines[:-1]:
            if closing.match(line.strip()):
                last = line.strip().strip(b"= ")
    if closing.match(tail.strip()):
        last = tail.strip().strip(b"= ")
    rc = p.wait()
    return rc, last.decode(errors="replace") or "no pytest closing line"
rc, first = run([])
print(f"fastlive-vm pass: first pass: {first} (pytest exit {rc})", flush=True)
if rc == 1:
    try:
        with open(os.path.join(cache, "v", "cache", "lastfailed")) as f:
            n = len(json.load(f))
    except (OSError, ValueError):
        n = 0
    if n:
        print(f"fastlive-vm: {n} failed test(s): running them once more (--lf)", flush=True)
        rc, again = run(["--lf"])
        print(f"fastlive-vm pass: rerun of {n} failed tests: {again} (pytest exit {rc})", flush=True)
    else:
        print("fastlive-vm pass: no rerun: the cache plugin recorded no failed test", flush=True)
sys.exit(rc)
EOF
    cat > "$o/init" <<EOF
#!/bin/busybox sh
# fastlive test VM (scripts/arm_kernels.sh): set up, run pytest, power off.
bb=/bin/busybox
\$bb mkdir -p /proc /sys /dev /tmp /run /root
\$bb mount -t proc proc /proc
echo "fastlive-vm: /init runs at \$(\$bb cut -d' ' -f1 /proc/uptime) s" >/dev/console
\$bb mount -t sysfs sysfs /sys
\$bb mount -t devtmpfs devtmpfs /dev 2>/dev/null
\$bb mkdir -p /dev/pts /dev/shm /tmp /run /root
\$bb mount -t devpts devpts /dev/pts
\$bb mount -t tmpfs tmpfs /dev/shm
\$bb mount -t tmpfs -o mode=1777 tmpfs /tmp
\$bb mount -t tmpfs -o mode=755 tmpfs /run
\$bb mkdir -p /run/netns
exec 0</dev/console 1>/dev/console 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root USER=root LOGNAME=root
export LANG=C.UTF-8 TERM=dumb PYTHONUNBUFFERED=1
# the signal for timed tests: a full-system emulated CPU (fastlive._platform.tcg_vm)
${tcg:+export FASTLIVE_TCG_VM='qemu-system TCG ($t, scripts/arm_kernels.sh)'}
ulimit -n 20000
\$bb hostname fastlive-vm
ip link set lo up
modprobe -a $MODULES 2>&1 | \$bb sed 's/^/fastlive-vm: /'
echo "fastlive-vm: Linux \$(\$bb uname -r) \$(\$bb uname -m), \$(\$bb nproc) CPUs, \$(python3 -c 'import socket; s=socket.socket(); print(len(s.getsockopt(6, 11, 512)))') bytes of TCP_INFO, ulimit -n \$(ulimit -n), up \$(\$bb cut -d' ' -f1 /proc/uptime) s"
cd /fastlive
python3 .vm_pytest.py
rc=\$?
\$bb timeout 120 python3 .vm_facts.py 2>&1
echo "FASTLIVE_VM_EXIT=\$rc after \$(\$bb cut -d' ' -f1 /proc/uptime) s"
\$bb sync
\$bb poweroff -f
EOF
    chmod 755 "$o/init"
    (cd "$o" && find . | cpio -o -H newc -R 0:0 --quiet) > "$d/run.cpio"
    cat "$img/root.cpio" "$d/run.cpio" > "$d/guest.cpio"
}

boot() {  # target -> runs the VM, output in $work/<target>/console.log
    local t=$1 img=$vmc/img-$1 d=$work/$1
    local q machine console
    q=$(field "$t" 4); machine=$(field "$t" 5); console=$(field "$t" 6)
    local -a acc=()
    case ${accel[$t]} in
        kvm) acc=(-accel kvm -cpu host) ;;
        tcg-x86) acc=(-cpu max) ;;
    esac
    local -a mach
    IFS='|' read -r -a mach <<<"$machine"
    local -a cmd=(timeout --kill-after=10 "$vm_timeout" nice -n 10 "$q" "${mach[@]}" "${acc[@]}"
        -smp "$vm_smp" -m "$vm_mem" -nographic -nic none -no-reboot
        -kernel "$img/vmlinuz" -initrd "$d/guest.cpio"
        -append "console=$console rdinit=/init panic=-1 loglevel=4")
    echo "${cmd[*]}" > "$d/cmd"
    local s=$SECONDS rc=0
    "${cmd[@]}" </dev/null >"$d/console.raw" 2>&1 &
    echo $! > "$d/pid"
    wait $! || rc=$?
    rm -f "$d/pid"
    rm -f "$d/guest.cpio"
    # no CRs, no terminal escapes (SeaBIOS clears the screen)
    tr -d '\r' <"$d/console.raw" | sed -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' >"$d/console.log"
    echo "$rc $((SECONDS - s))" > "$d/qemu-rc"
}

# KVM for an x86_64 guest when /dev/kvm works here; ARM guests are TCG
declare -A accel=()
for t in $targets; do
    q=$(field "$t" 4)
    accel[$t]=tcg
    [ "$q" = qemu-system-x86_64 ] || continue
    accel[$t]='tcg-x86'
    if [ -w /dev/kvm ] && timeout 20 "$q" -accel kvm -M none -nographic -nodefaults </dev/null >/dev/null 2>&1; then
        accel[$t]=kvm
    fi
done

# Interrupted: stop the VMs (timeout passes the signal on to qemu).
stop_vms() {
    local t
    for t in $targets; do
        [ -f "$work/$t/pid" ] && kill -TERM "$(cat "$work/$t/pid")" 2>/dev/null || true
    done
}
trap 'stop_vms; exit 130' INT TERM HUP

declare -A vm=()
for t in $targets; do
    mkdir -p "$work/$t"
    make_run_cpio "$t" "$@"
    say "boot $t (${accel[$t]}): Linux $(cat "$vmc/img-$t/kver"), $(basename "${wheel[$t]}"), pytest $*"
    boot "$t" & vm[$t]=$!
done
failed=()        # pytest finished and failed (after the in-guest rerun, if any)
unfinished=()    # the VM ended before pytest's closing line (crash, time cap)
rm -f "$work/unfinished"
declare -A closing=()
for t in $targets; do
    wait "${vm[$t]}" || true
    d=$work/$t
    read -r qrc secs <"$d/qemu-rc"
    echo "---------------------------------------------------------------- $t console"
    cat "$d/console.log"
    exitline=$(grep -m1 '^FASTLIVE_VM_EXIT=' "$d/console.log" || true)
    last=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$d/console.log" | tail -1 || true)
    # the guest's closing line per pytest pass: "first pass: ...", "rerun of N failed tests: ..."
    passes=$(sed -n 's/^fastlive-vm pass: //p' "$d/console.log" | awk 'NR > 1 { printf "; " } { printf "%s", $0 }')
    if [ -z "$exitline" ]; then
        if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then why="VM killed after the ${vm_timeout} s cap"
        else why="VM ended (qemu exit $qrc) before pytest finished"; fi
        closing[$t]="$why; ${passes:+$passes; }last pytest line: ${last:-none}"
        unfinished+=("$t")
    else
        prc=${exitline#FASTLIVE_VM_EXIT=}; prc=${prc%% *}
        closing[$t]="${passes:-${last:-no pytest closing line}} -> exit $prc, ${secs} s wall"
        case $passes in
            *"rerun of "*) [ "$prc" = 0 ] && closing[$t]+=" (FLAKY: failed, then passed on the rerun)" ;;
        esac
        [ "$prc" = 0 ] || failed+=("$t")
    fi
done
echo "----------------------------------------------------------------"
for t in $targets; do
    printf '%-11s Linux %-20s %s\n' "$t" "$(cat "$vmc/img-$t/kver")" "${closing[$t]}"
done
[ ${#failed[@]} = 0 ] || die "tests failed on a real kernel: ${failed[*]}${unfinished[*]:+ (and no finished run: ${unfinished[*]})} (see above; logs in $work)"
if [ ${#unfinished[@]} -gt 0 ]; then
    # exit 75: only VMs that never finished (nothing failed); the targets are
    # in $work/unfinished, so a caller can run those once more
    printf '%s\n' "${unfinished[*]}" > "$work/unfinished"
    printf 'FAIL: arm_kernels: no closing pytest line from: %s (list in %s)\n' \
        "${unfinished[*]}" "$work/unfinished" >&2
    exit 75
fi
say "done in $((SECONDS - t0)) s"
