# Sourced by the quick-start scripts: system packages, bpffs, cargo on PATH.
# Idempotent: packages already present are not reinstalled, and `apt-get update`
# runs at most once per invocation.

AMBIT_PACKAGES=(clang llvm libbpf-dev protobuf-compiler libprotobuf-dev iproute2 iptables curl ca-certificates)

ambit_log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ambit_as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else
    echo "need root to run: $* (re-run as root or install sudo)" >&2
    return 1
  fi
}

ambit_install_packages() {
  local missing=()
  for p in "${AMBIT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing packages ${missing[*]} and no apt-get: install them by hand" >&2
    return 1
  fi
  ambit_log "installing system packages: ${missing[*]}"
  ambit_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  ambit_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

ambit_mount_bpffs() {
  if [ "$(id -u)" -ne 0 ]; then
    return 0
  fi
  if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf || echo "warning: could not mount bpffs at /sys/fs/bpf" >&2
  fi
}

ambit_cargo_path() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust first (https://rustup.rs)" >&2; return 1; }
}

ambit_setup() {
  ambit_cargo_path
  ambit_install_packages
  ambit_mount_bpffs
}
