#!/usr/bin/env bash
# Provisions one Debian/Ubuntu host for polysignal behind nginx, with Redis (docs/deploy.md):
#
#   sudo deploy/provision-linux.sh signal.example.com
#
# - installs redis-server, nginx and python3-venv (apt-get);
# - installs polysignal into a venv at /opt/polysignal from POLYSIGNAL_PACKAGE: a wheel file or a
#   pip requirement (default: `polysignal`, from PyPI);
# - writes /etc/polysignal/env (only if it does not exist: your settings are never overwritten),
#   /etc/systemd/system/polysignal.service (deploy/polysignal.service), the nginx site
#   /etc/nginx/sites-available/polysignal (deploy/nginx.conf, one local upstream, server_name
#   DOMAIN) and /etc/sysctl.d/60-polysignal.conf, and starts or reloads what changed.
#
# Idempotent: a second run with the same inputs changes nothing and says so. To upgrade
# polysignal, run it again with another POLYSIGNAL_PACKAGE (e.g. `polysignal==0.2.0`).
#
# Environment:
#   POLYSIGNAL_PACKAGE   wheel path or pip requirement to install (default: polysignal)
#   PYTHON               the Python that makes the venv (default: python3, >= 3.11)
#   PROVISION_ROOT       write every file under this directory instead of / (default: /)
#   PROVISION_DRY_RUN=1  log the commands that act on the host (apt-get, systemctl, nginx,
#                        sysctl) instead of running them; files are still written under
#                        PROVISION_ROOT, and the venv made there. With a PROVISION_ROOT, this is
#                        how the test suite runs it (tests/deploy/test_provision.py).
set -euo pipefail

usage() {
  echo "usage: $0 DOMAIN   (e.g. $0 signal.example.com)" >&2
  exit 2
}
[ $# -eq 1 ] || usage
domain=$1
if ! [[ $domain =~ ^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$ ]]; then
  echo "provision: '$domain' is not a domain name" >&2
  exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=${PROVISION_ROOT:-}
root=${root%/}
dry_run=${PROVISION_DRY_RUN:-0}
package=${POLYSIGNAL_PACKAGE:-polysignal}
python=${PYTHON:-python3}
venv=/opt/polysignal
changes=0

for source in polysignal.service nginx.conf; do
  if [ ! -f "$here/$source" ]; then
    echo "provision: $here/$source is missing: run this script from a copy of deploy/" >&2
    exit 2
  fi
done
if [ "$dry_run" != 1 ] && [ "$(id -u)" != 0 ]; then
  echo "provision: run as root (or with PROVISION_DRY_RUN=1 to see what it would do)" >&2
  exit 2
fi

say() { echo "provision: $*"; }

# A command that acts on the host itself: logged, not run, in a dry run.
host() {
  if [ "$dry_run" = 1 ]; then
    say "dry-run, not running: $*"
  else
    "$@"
  fi
}

# install_file MODE DEST: DEST (under the root) gets stdin's content if it differs; returns 0
# when it changed the file, 1 when it was already so.
install_file() {
  local mode=$1 dest=$root$2 new
  new=$(mktemp)
  cat >"$new"
  if [ -f "$dest" ] && cmp -s "$new" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
    rm -f "$new"
    say "unchanged: $2"
    return 1
  fi
  # Written beside its destination, then renamed over it: never half a file in place.
  mkdir -p "$(dirname "$dest")"
  cp "$new" "$dest.provision-new"
  rm -f "$new"
  chmod "$mode" "$dest.provision-new"
  mv -f "$dest.provision-new" "$dest"
  say "wrote $2"
  changes=$((changes + 1))
  return 0
}

# --- 1. Debian packages --------------------------------------------------------------------------
packages=(redis-server nginx python3-venv)
if [ "$dry_run" = 1 ]; then
  say "dry-run, not running: apt-get install ${packages[*]} (those missing)"
else
  missing=()
  for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
      missing+=("$pkg")
    fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    changes=$((changes + 1))
  else
    say "unchanged: ${packages[*]} are installed"
  fi
fi
host systemctl enable --now redis-server

# --- 2. polysignal in a venv ---------------------------------------------------------------------
package_changed=0
if [ ! -x "$root$venv/bin/python" ]; then
  say "creating the venv $venv"
  "$python" -m venv "$root$venv"
  changes=$((changes + 1))
fi
# What is installed is recorded as the requirement and, for a wheel file, its SHA-256: the same
# inputs install nothing the second time.
if [ -f "$package" ]; then
  wanted="$package sha256:$(sha256sum "$package" | cut -d' ' -f1)"
else
  wanted=$package
fi
stamp=$root$venv/.provisioned
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && [ -x "$root$venv/bin/polysignal" ]; then
  say "unchanged: $venv has $package"
else
  say "installing $package into $venv"
  "$root$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$package"
  printf '%s\n' "$wanted" >"$stamp"
  say "installed $("$root$venv/bin/polysignal" --version)"
  changes=$((changes + 1))
  package_changed=1
fi

# --- 3. settings ---------------------------------------------------------------------------------
env_changed=0
if [ -f "$root/etc/polysignal/env" ]; then
  say "unchanged: /etc/polysignal/env exists (yours: never overwritten)"
else
  install_file 0640 /etc/polysignal/env <<EOF && env_changed=1
# polysignal settings, one VAR=value per line (docs/configuration.md); then
# \`systemctl restart polysignal\`. Written by deploy/provision-linux.sh for $domain.
HOST=127.0.0.1
PORT=4444
BACKEND=redis://127.0.0.1:6379/0
# nginx on this host connects from 127.0.0.1: read the client from its X-Forwarded-For.
TRUSTED_PROXIES=127.0.0.1/32
# The pages that may connect (docs/operations/edge.md); * = any page.
ALLOWED_ORIGINS=https://$domain
DRAIN_SECONDS=10
LOG_FORMAT=json
# Rooms (socket.io): set both to turn the protocol on.
#APP_SECRET=
#APP_PASS=
EOF
fi

# --- 4. kernel limits for many connections -------------------------------------------------------
if install_file 0644 /etc/sysctl.d/60-polysignal.conf <<'EOF'; then
# Written by deploy/provision-linux.sh: limits for 100k+ WebSocket connections
# (docs/deploy.md, "Many connections").
fs.file-max = 2097152
fs.nr_open = 1048576
net.core.somaxconn = 4096
net.ipv4.tcp_max_syn_backlog = 8192
net.ipv4.ip_local_port_range = 1024 65535
EOF
  host sysctl -q -p /etc/sysctl.d/60-polysignal.conf || say "sysctl failed (a container?): set these on the host"
fi

# --- 5. systemd ----------------------------------------------------------------------------------
unit_changed=0
install_file 0644 /etc/systemd/system/polysignal.service <"$here/polysignal.service" && unit_changed=1
if [ $unit_changed = 1 ]; then
  host systemctl daemon-reload
fi
host systemctl enable polysignal
if [ $((unit_changed + package_changed + env_changed)) -gt 0 ]; then
  host systemctl restart polysignal
else
  host systemctl start polysignal
fi

# --- 6. nginx ------------------------------------------------------------------------------------
# deploy/nginx.conf with the upstream being this host's node and server_name the domain.
site_changed=0
site=$(awk -v domain="$domain" '
  /^[[:space:]]*server polysignal-1:4444/ { sub(/polysignal-1:4444.*/, "127.0.0.1:4444;") }
  /^[[:space:]]*server polysignal-[0-9]+:4444/ { next }
  /^[[:space:]]*server_name _;/ { sub(/_;/, domain ";") }
  { print }
' "$here/nginx.conf")
install_file 0644 /etc/nginx/sites-available/polysignal <<<"$site" && site_changed=1
link=$root/etc/nginx/sites-enabled/polysignal
if [ "$(readlink "$link" 2>/dev/null)" != /etc/nginx/sites-available/polysignal ]; then
  mkdir -p "$(dirname "$link")"
  ln -sfn /etc/nginx/sites-available/polysignal "$link"
  say "linked /etc/nginx/sites-enabled/polysignal"
  changes=$((changes + 1))
  site_changed=1
else
  say "unchanged: /etc/nginx/sites-enabled/polysignal"
fi
if [ $site_changed = 1 ]; then
  host nginx -t -q
  host systemctl reload-or-restart nginx
fi

# --- done ----------------------------------------------------------------------------------------
if [ $changes = 0 ]; then
  say "nothing changed: this host was already provisioned for $domain"
else
  say "done: $changes change(s) for $domain"
fi
cat <<EOF

polysignal listens on 127.0.0.1:4444 behind nginx on port 80 for $domain.
Check it: curl -H 'Host: $domain' http://127.0.0.1/readyz    (answers: ready)
Settings: /etc/polysignal/env, then systemctl restart polysignal. Logs: journalctl -u polysignal

TLS (wss:// and https://) with Let's Encrypt, once $domain points at this host:
  apt-get install certbot python3-certbot-nginx
  certbot --nginx -d $domain --redirect
certbot adds the certificate to /etc/nginx/sites-available/polysignal and renews it by itself;
nginx terminates TLS, so polysignal needs no TLS_CERT.
EOF
