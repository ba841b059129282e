#!/usr/bin/env bash
# Start the services the tests use, when they are not already running:
#   Redis   on 127.0.0.1:6379 (nothing kept on disk)
#   MariaDB on 127.0.0.1:3306 (root, empty password)
set -euo pipefail

redis_up() { python3 - <<'PY'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", 6379), timeout=1); s.sendall(b"PING\r\n")
    sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
}
mariadb_up() { mysqladmin -h127.0.0.1 -uroot --connect-timeout=2 ping >/dev/null 2>&1; }
wait_for() { for _ in $(seq 1 60); do "$1" && return 0; sleep 0.5; done; echo "$2 did not start" >&2; return 1; }

if ! redis_up; then
  if ! command -v redis-server >/dev/null; then
    [ "$(id -u)" = 0 ] && { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
  fi
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  echo "starting Redis on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for redis_up Redis
fi

if ! mariadb_up; then
  if [ ! -x /usr/sbin/mariadbd ]; then
    [ "$(id -u)" = 0 ] && { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server >/dev/null; }
  fi
  echo "starting MariaDB on 127.0.0.1:3306"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_for mariadb_up MariaDB
fi
