# shellcheck shell=bash
# Helpers shared by the scripts in this folder. Sourced, not run.

# A step, on stderr so it never mixes with output meant for pipes.
mq_log() {
  if [[ -t 2 ]]; then
    printf '\033[1;34m==>\033[0m \033[1m%s\033[0m\n' "$*" >&2
  else
    printf '==> %s\n' "$*" >&2
  fi
}

mq_warn() {
  printf 'warning: %s\n' "$*" >&2
}

mq_die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Runs a command as root: directly when we are root, else through sudo.
mq_as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    mq_die "this step needs root: run as root, or install sudo (wanted: $*)"
  fi
}

# Runs a command as the `postgres` OS user (peer authentication over the local socket), from `/` so that psql
# does not complain about a working directory it cannot read.
mq_as_postgres() {
  if [[ $EUID -eq 0 ]]; then
    (cd / && runuser -u postgres -- "$@")
  else
    (cd / && sudo -u postgres "$@")
  fi
}

# Installs Debian packages (no recommends, no questions); runs `apt-get update` once per script run.
_mq_apt_updated=0
mq_apt_install() {
  command -v apt-get >/dev/null 2>&1 || mq_die "apt-get not found: install $* with your system's package manager"
  if [[ $_mq_apt_updated -eq 0 ]]; then
    mq_log "apt-get update"
    mq_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    _mq_apt_updated=1
  fi
  mq_log "apt-get install $*"
  mq_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# Installs Debian packages that ship a daemon without starting it: while it runs, a policy-rc.d that answers 101
# ("action forbidden") keeps invoke-rc.d / deb-systemd-invoke from starting the system service (Debian's container
# images have one already; then it is left as it is). A system instance that already runs is left alone.
mq_apt_install_no_start() {
  local policy=/usr/sbin/policy-rc.d added=0
  if ! mq_as_root test -e "$policy"; then
    mq_as_root sh -c "printf '#!/bin/sh\n# Added by mailqueue scripts: do not start services from apt.\nexit 101\n' >$policy && chmod 755 $policy"
    added=1
  fi
  local status=0
  mq_apt_install "$@" || status=$?
  if [[ $added -eq 1 ]]; then
    mq_as_root rm -f "$policy"
  fi
  return "$status"
}

# The local Microsoft 365 sandbox's Debian packages: Dovecot (not started as a system service), setpriv, python3.
mq_ensure_sandbox_packages() {
  local missing=()
  [[ -x /usr/sbin/dovecot ]] || command -v dovecot >/dev/null 2>&1 || missing+=(dovecot-imapd)
  command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  if [[ ${#missing[@]} -gt 0 ]]; then
    mq_apt_install_no_start "${missing[@]}"
  fi
  local version
  version=$( (/usr/sbin/dovecot --version || dovecot --version) 2>/dev/null | head -n 1) ||
    mq_die "dovecot was installed, but \`dovecot --version\` fails"
  mq_log "sandbox: Dovecot $version ready (no system service started by this script)"
}
