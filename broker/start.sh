#!/bin/sh
# Starts Mosquitto in the compose stack (compose.yaml mounts broker/ at /revline/broker).
#
# Mosquitto reads its password file, ACL and TLS key only after dropping root for the `mosquitto`
# user, and they must not be readable by anyone else; the files in broker/ belong to whoever ran
# `revline init` / `revline device add` on the host. So copy them into a directory of the
# broker's own, owned by `mosquitto`, mode 0600, then start the broker. After `revline device
# add`, apply the change with `docker compose restart mosquitto` (sessions and queues survive a
# clean restart).
#
# The environment variables exist for the tests (tests/fixtures/broker.py), which stage the files
# the same way for a broker they start themselves.
set -eu
src=${REVLINE_BROKER_DIR:-/revline/broker}
run=${REVLINE_BROKER_RUN_DIR:-/mosquitto/secrets}
mosquitto=${REVLINE_MOSQUITTO:-/usr/sbin/mosquitto}

if [ ! -s "$src/secrets/passwd" ]; then
    echo "revline broker: no logins: $src/secrets/passwd is missing or empty; create them with" \
        "\`revline init\` and \`revline device add\` (see docs/broker.md). Anonymous clients are refused." >&2
    exit 1
fi
for file in server.crt server.key ca.crt; do
    if [ ! -s "$src/secrets/tls/$file" ]; then
        echo "revline broker: no TLS certificate: $src/secrets/tls/$file is missing or empty;" \
            "make them with \`revline init --hostname <your broker's name>\` or supply your own (see docs/broker.md)." >&2
        exit 1
    fi
done
umask 077
mkdir -p "$run"
cp "$src/secrets/passwd" "$run/passwd"
cp "$src/acl" "$run/acl"
for file in server.crt server.key ca.crt; do
    cp "$src/secrets/tls/$file" "$run/$file"
done
chmod 0700 "$run"
chmod 0600 "$run/passwd" "$run/acl" "$run/server.crt" "$run/server.key" "$run/ca.crt"
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown -R mosquitto:mosquitto "$run"
fi
exec "$mosquitto" -c "$src/mosquitto.conf"
