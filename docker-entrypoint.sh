#!/bin/sh
# Container entrypoint. Started as root (the image's default), it hands the data folder to the
# unprivileged user 10001 — Railway mounts a volume root-owned at start, after the image was
# built, so the build cannot do it — then runs the command as 10001:10001 with no supplementary
# groups. Started as any other user (e.g. `docker run --user 10001`), it just runs the command.
set -eu

app_id=10001

if [ "$(id -u)" -ne 0 ]; then
    exec "$@"
fi

# KEYPOOLER_DATA_DIR (default /app/data, the folder of the image's DB_PATH) and the service's
# Railway volume, if any. Never `/`: that would hand over the whole filesystem.
for dir in "${KEYPOOLER_DATA_DIR:-/app/data}" "${RAILWAY_VOLUME_MOUNT_PATH:-}"; do
    case "$dir" in
        "" | /) continue ;;
    esac
    mkdir -p "$dir"
    chown -R "$app_id:$app_id" "$dir"
done

exec setpriv --reuid="$app_id" --regid="$app_id" --clear-groups -- "$@"
