#!/usr/bin/env bash
# End to end on the embedded executor: start two local registries, seed a multi-arch image
# into the first, copy it with `ferry copy --all`, inspect the copy, and check it with skopeo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

work=$(mktemp -d)
# start_registry runs in a $(...) subshell, so each registry's pid goes to a file the cleanup reads
cleanup() {
  for f in "$work"/*/pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start_registry() {
  local name=$1 port; port=$(free_port)
  mkdir -p "$work/$name"
  cat > "$work/$name/config.yml" <<YAML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/$name/data}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$port}
YAML
  docker-registry serve "$work/$name/config.yml" >"$work/$name/log" 2>&1 &
  echo $! > "$work/$name/pid"
  python3 - "$port" <<'PY'
import sys, time, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/", timeout=1)
        break
    except Exception:
        time.sleep(0.05)
PY
  echo "127.0.0.1:$port"
}

SRC=$(start_registry source)
DST=$(start_registry destination)
echo "== registries: source $SRC, destination $DST"

echo "== seeding $SRC/demo/app:1 (linux/amd64 + linux/arm64, 3 layers each)"
PYTHONPATH=. .venv/bin/python -m scripts.seed "$SRC" demo/app:1

echo "== ferry copy --all"
ferry copy --all --src-tls-verify=false --dest-tls-verify=false \
  "docker://$SRC/demo/app:1" "docker://$DST/mirror/app:1"

echo "== ferry inspect (destination)"
ferry inspect --tls-verify=false "docker://$DST/mirror/app:1"

echo "== skopeo agrees: raw manifests are byte-identical"
a=$(skopeo inspect --raw --tls-verify=false "docker://$SRC/demo/app:1" | sha256sum)
b=$(skopeo inspect --raw --tls-verify=false "docker://$DST/mirror/app:1" | sha256sum)
[ "$a" = "$b" ] && echo "identical: ${a%% *}"
